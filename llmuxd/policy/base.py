"""The pure policy seam: what a scheduling policy sees and what it may decide.

A policy gets a snapshot (per-model state, queues, in-flight, clock, switch-cost
EMAs) and returns decisions; it never touches processes, sockets or the clock
itself. That keeps policies testable edge by edge and lets them be replayed in
a simulation without any child.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from llmuxd.policy.options import PolicyOptions
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
    # Added for the scheduling policies (issue 10); the defaults keep fifo's inputs.
    wait_age_sum: float | None = None  # sum over waiters of (now - arrival); None: unknown
    newest_wait: float | None = None   # monotonic time the newest waiter arrived
    max_num_seqs: int = 256       # vLLM serves this many at once; more wait inside vLLM
    idle_since: float | None = None    # ACTIVE with nothing in flight or queued since then
    always_active: bool = False   # operator wants it kept awake: never evicted by a policy
    switched_in_secs: float = 0.0  # sleep+wake/start time of the switch that made it ACTIVE
    wake_secs: float | None = None  # expected time to become ACTIVE from its current state
    sleep_secs: float | None = None  # expected time to leave the GPU at its sleep_level

    def waiting_age(self, now: float) -> float:
        """Age of the oldest waiter (0 when none)."""
        return 0.0 if self.oldest_wait is None else max(0.0, now - self.oldest_wait)

    def evictable(self) -> bool:
        """May a policy choose to make this model leave its GPUs at all?"""
        return not (self.pinned or self.always_active)


@dataclass(frozen=True)
class PolicyInput:
    models: dict[str, ModelView]
    now: float
    drain_before_switch: bool
    min_active_secs: float
    costs: dict[tuple[str | None, str], float] = field(default_factory=dict)
    options: PolicyOptions = field(default_factory=lambda: PolicyOptions())
    request_timeout_secs: float = 60.0   # a waiter older than this gets a 504


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
    drain_secs: float | None = None  # cap on the drain; None: daemon.drain_timeout_secs


Decision = Activate | Deactivate


@dataclass(frozen=True)
class Decisions:
    actions: list[Decision]
    recheck_at: float | None = None   # come back by then even if nothing happens


class Policy(Protocol):
    """A scheduling policy: pure function of its input."""

    name: str

    def decide(self, inp: PolicyInput) -> Decisions: ...
