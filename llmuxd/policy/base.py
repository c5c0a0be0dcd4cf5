"""The pure policy seam: what a scheduling policy sees and what it may decide.

A policy gets a snapshot (per-model state, queues, in-flight, clock, switch-cost
EMAs) and returns decisions; it never touches processes, sockets or the clock
itself. That keeps policies testable edge by edge and lets them be replayed in
a simulation without any child.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from llmuxd.states import ModelState


@dataclass(frozen=True)
class ModelView:
    """One model as the policy sees it."""

    name: str
    state: ModelState
    busy: bool                    # an operation (start, wake, sleep...) is running
    in_flight: int
    queued: int                   # waiting leases plus explicit start/switch demands
    oldest_wait: float | None     # monotonic time the oldest waiter arrived
    active_since: float | None    # monotonic time it became ACTIVE (None if not)
    gpus: tuple[int, ...]
    fraction: float               # gpu_memory_utilization
    sleep_level: int              # configured level for when it must leave
    ready_at: float = 0.0         # BACKOFF: not before this monotonic time
    pinned: bool = False          # must not be evicted (validate runs on it)


@dataclass(frozen=True)
class PolicyInput:
    models: dict[str, ModelView]
    now: float
    drain_before_switch: bool
    min_active_secs: float
    costs: dict[tuple[str | None, str], float] = field(default_factory=dict)


@dataclass(frozen=True)
class Activate:
    """Start or wake ``model`` (everything in its way has already left)."""

    model: str
    reason: str


@dataclass(frozen=True)
class Deactivate:
    """Make ``model`` leave its GPUs: drain (optional), then sleep at ``level``."""

    model: str
    level: int
    drain: bool
    reason: str
    for_model: str | None = None   # the model this makes room for (switch record)


Decision = Activate | Deactivate


@dataclass(frozen=True)
class Decisions:
    actions: list[Decision]
    recheck_at: float | None = None   # come back by then even if nothing happens


class Policy(Protocol):
    """A scheduling policy: pure function of its input."""

    name: str

    def decide(self, inp: PolicyInput) -> Decisions: ...
