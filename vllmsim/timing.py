"""The simulator's timing model: how long start, sleep, wake and tokens take.

Durations follow from a declared model size and bandwidths, as on a real GPU box:

* cold start  = load + warm-up (load defaults to size / disk bandwidth)
* L1 sleep    = size / D2H          (weights copied to pinned host RAM)
* L1 wake     = size / H2D          (copied back)
* L2 sleep    = a fixed small cost  (weights discarded)
* L2 wake     = a fixed small cost  (memory re-mapped, contents garbage)
* reload      = size / disk + size / H2D   (`collective_rpc reload_weights`)
* tokens      = 1 / token rate each, after a time to first token

Every duration is multiplied by one global `scale`, so tests run the same model
in milliseconds and demos can look real.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SIZE_HINT = re.compile(r"(?<![0-9A-Za-z.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])")


def size_from_model_name(model: str, default_gib: float = 2.0) -> float:
    """Guess weights size in GiB from a name like "Qwen/Qwen3-14B" (2 bytes/param)."""
    hits = _SIZE_HINT.findall(model.rsplit("/", 1)[-1])
    if not hits:
        return default_gib
    return float(hits[-1]) * 2.0


@dataclass
class Timing:
    """All the constants of the timing model (seconds, GiB, GiB/s, tokens/s)."""

    size_gib: float = 2.0
    d2h_gibps: float = 50.0  # pinned copies measured on an H100 here: 51 GiB/s
    h2d_gibps: float = 44.0  # and 44 GiB/s host->GPU
    disk_gibps: float = 2.0
    load_s: float | None = None
    warmup_s: float = 5.0
    token_rate: float = 50.0
    ttft_s: float = 0.05
    l2_sleep_s: float = 0.2
    l2_wake_s: float = 0.3
    scale: float = 1.0

    def scaled(self, seconds: float) -> float:
        return max(0.0, seconds * self.scale)

    def start_s(self) -> float:
        load = self.load_s if self.load_s is not None else self.size_gib / self.disk_gibps
        return self.scaled(load + self.warmup_s)

    def sleep_s(self, level: int) -> float:
        if level == 1:
            return self.scaled(self.size_gib / self.d2h_gibps)
        if level == 2:
            return self.scaled(self.l2_sleep_s)
        return 0.0

    def wake_s(self, level: int) -> float:
        """Time to bring the weights back after a sleep at `level`."""
        if level == 1:
            return self.scaled(self.size_gib / self.h2d_gibps)
        if level == 2:
            return self.scaled(self.l2_wake_s)
        return 0.0

    def reload_s(self) -> float:
        return self.scaled(self.size_gib / self.disk_gibps + self.size_gib / self.h2d_gibps)

    def token_interval_s(self) -> float:
        return self.scaled(1.0 / self.token_rate) if self.token_rate > 0 else 0.0

    def first_token_s(self) -> float:
        return self.scaled(self.ttft_s)
