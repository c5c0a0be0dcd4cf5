"""The policy simulator's inputs: request traces and switch-cost presets (pure data).

Two families of traces, both deterministic for a seed:

* ``poisson_*``: sustained open-loop traffic, Poisson arrivals per model, request
  lengths from short chats to multi-minute generations, for simulated hours;
* ``RUST_PROFILES``: the 12 workloads of Rust llmux 0.9's ``tests/policy_sim.rs``,
  same generators (reference notes, appendix), requests of 0.5 s served one at a time.

The per-level costs are those of the simulator's timing model (``vllmsim/timing.py``
defaults for a 14B model, 28 GiB of weights), copied here because llmuxd does not
import the simulator; ``tests/policy/test_workloads.py`` checks they still agree.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    model: str
    arrival: float      # seconds from the start of the run
    length: float       # seconds of generation once running in vLLM


@dataclass(frozen=True)
class Costs:
    """Seconds of GPU time for one model's operations."""

    name: str
    sleep_s: float      # leaving the GPU at the model's level
    wake_s: float       # coming back from that level
    start_s: float      # cold start (after a level-3 stop)
    level: int = 1


def fixed(seconds: float) -> Costs:
    """The Rust simulator's fixed switch cost: all of it in the wake."""
    return Costs(f"{seconds:g}s", 0.0, seconds, 3 * seconds)


# vllmsim Timing(size_gib=28): L1 sleep = 28/50, wake = 28/44; L2 sleep 0.2, wake
# 0.3 + reload (28/2 + 28/44); cold start = 28/2 + 5 s warm-up.
SIZE_14B_GIB = 28.0
L1_14B = Costs("14B-L1", SIZE_14B_GIB / 50.0, SIZE_14B_GIB / 44.0, SIZE_14B_GIB / 2.0 + 5.0, 1)
L2_14B = Costs("14B-L2", 0.2, 0.3 + SIZE_14B_GIB / 2.0 + SIZE_14B_GIB / 44.0,
               SIZE_14B_GIB / 2.0 + 5.0, 2)
COSTS: dict[str, Costs] = {c.name: c for c in
                           (fixed(2), fixed(5), fixed(10), fixed(20), L1_14B, L2_14B)}


@dataclass(frozen=True)
class Workload:
    name: str
    models: tuple[str, ...]
    requests: tuple[Request, ...]
    max_num_seqs: int = 256
    duration: float | None = None   # open-loop: the arrival window; None: until all done


# --------------------------------------------------------------------------
# (a) Poisson open-loop traffic

def chat_length(rng: random.Random) -> float:
    """Mostly short chats, some long answers, a few one-minute generations."""
    u = rng.random()
    if u < 0.90:
        return rng.uniform(0.3, 2.0)
    if u < 0.99:
        return rng.uniform(3.0, 10.0)
    return rng.uniform(30.0, 60.0)


def long_length(rng: random.Random) -> float:
    return rng.uniform(60.0, 300.0)


def poisson(name: str, rates: dict[str, float], duration: float, seed: int,
            length: Callable[[random.Random], float] = chat_length) -> Workload:
    """Independent Poisson streams, one per model, for ``duration`` seconds."""
    rng = random.Random(seed)
    reqs: list[Request] = []
    for model, rate in rates.items():
        t = rng.expovariate(rate)
        while t < duration:
            reqs.append(Request(model, t, length(rng)))
            t += rng.expovariate(rate)
    reqs.sort(key=lambda r: (r.arrival, r.model))
    return Workload(name, tuple(rates), tuple(reqs), duration=duration)


def poisson_workloads(duration: float = 3600.0, seed: int = 7) -> list[Workload]:
    return [
        poisson("even", {"a": 0.1, "b": 0.1, "c": 0.1}, duration, seed),
        poisson("skewed", {"a": 0.2, "b": 0.05, "c": 0.01}, duration, seed + 1),
        poisson("trickle", {"flood": 2.0, "trickle": 1 / 300}, duration, seed + 2),
        poisson("five", {m: 0.04 for m in "abcde"}, duration, seed + 3),
        poisson("long", {"a": 1 / 120, "b": 1 / 120}, duration, seed + 4, long_length),
    ]


# --------------------------------------------------------------------------
# (b) The Rust simulator's 12 profiles (tests/policy_sim.rs @ v0.9)

SERVICE = 0.5


def _w(name: str, pairs: list[tuple[str, float]]) -> Workload:
    reqs = tuple(sorted((Request(m, t, SERVICE) for m, t in pairs),
                        key=lambda r: (r.arrival, r.model)))
    models = tuple(sorted({m for m, _ in pairs}))
    return Workload(name, models, reqs, max_num_seqs=1)


def _bursty(name: str, bursts: int, size: int) -> Workload:
    return _w(name, [("A" if b % 2 == 0 else "B", 5.0 * b + 0.01 * i)
                     for b in range(bursts) for i in range(size)])


def _dominant(name: str, n: int, share_a: float) -> Workload:
    n_b = round(n * (1 - share_a))
    every = n / n_b if n_b else n + 1
    b_at = {int(k * every) for k in range(n_b)}
    return _w(name, [("B" if i in b_at else "A", 0.05 * i) for i in range(n)])


def _random(name: str, n: int, seed: int) -> Workload:
    state = seed
    t = 0.0
    pairs = []
    mask = (1 << 64) - 1
    for _ in range(n):
        state = (state * 6364136223846793005 + 1442695040888963407) & mask
        model = "A" if (state >> 33) % 2 == 0 else "B"
        pairs.append((model, t))
        t += ((state >> 40) % 200) / 1000
    return _w(name, pairs)


def rust_profiles() -> list[Workload]:
    return [
        _w("single_model", [("A", 0.1 * i) for i in range(40)]),
        _w("balanced", [p for i in range(20) for p in (("A", 0.2 * i), ("B", 0.2 * i + 0.1))]),
        _bursty("bursty", 4, 10),
        _dominant("dominant", 50, 0.8),
        _w("interleave", [p for i in range(30)
                          for p in (("A", 0.01 * i), ("B", 0.01 * i + 0.001))]),
        _w("surge", [("A", 0.5 * i) for i in range(20)] + [("B", 5.0 + 0.01 * i)
                                                          for i in range(20)]),
        _w("three_model", [("ABC"[idx], 3.0 * (3 * rnd + idx) + 0.1 * i)
                           for rnd in range(2) for idx in range(3) for i in range(10)]),
        _random("random_50", 50, 42),
        _random("random_100", 100, 123),
        _random("random_200", 200, 456),
        _dominant("dominant_95", 80, 0.95),
        _bursty("heavy_burst", 6, 50),
    ]
