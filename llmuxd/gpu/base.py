"""The GPU probe seam: what the daemon needs to know about GPU memory.

The daemon never trusts a sleep call's HTTP answer on its own (vllm#32714: a
sleep can answer 200 and free nothing), so every backend must be able to say
how much memory each GPU holds, and, where it can, which process holds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as the probe sees it right now."""

    index: int
    name: str
    total_mib: int
    used_mib: int

    @property
    def free_mib(self) -> int:
        return max(0, self.total_mib - self.used_mib)


class GpuProbe(Protocol):
    """A source of GPU memory readings (NVML, the simulator's state, or none)."""

    name: str

    def gpus(self) -> list[GpuInfo]:
        """Every GPU with its memory now; empty when there is no GPU to read."""
        ...

    def usage_by_pid(self) -> dict[int, dict[int, int]] | None:
        """pid -> {gpu index -> MiB}; None when memory cannot be attributed to pids."""
        ...
