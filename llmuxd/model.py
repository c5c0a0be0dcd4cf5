"""One model's runtime record, owned by the supervisor thread.

Every state change goes through ``enter(new, reason)``, which checks the
transition table and logs from/to/why, so an impossible edge is a loud bug and
the log alone tells the story of a model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import structlog

from llmuxd.config import ModelConfig
from llmuxd.states import ModelState, check_transition

log = structlog.get_logger("llmuxd.model")

LEARN_ALPHA = 0.3       # the original's switch-cost EMA weight


@dataclass
class SwitchRecord:
    """One switch: who left, who came, how long each phase took."""

    to: str | None
    from_: list[str]
    started_at: float                       # wall clock
    started_mono: float
    phases_ms: dict[str, float] = field(default_factory=dict)
    result: str = "pending"
    total_ms: float | None = None

    def add(self, phase: str, seconds: float) -> None:
        self.phases_ms[phase] = round(self.phases_ms.get(phase, 0.0) + seconds * 1000, 3)

    def finish(self, result: str) -> None:
        self.result = result
        self.total_ms = round((time.monotonic() - self.started_mono) * 1000, 3)

    def to_dict(self) -> dict[str, Any]:
        return {
            "from": ",".join(self.from_) if self.from_ else None,
            "to": self.to, "result": self.result, "started_at": self.started_at,
            "phases_ms": dict(self.phases_ms), "total_ms": self.total_ms,
        }


@dataclass
class Operation:
    """One running operation of a model, shared by its worker thread and the loop.

    It carries its own cleanup: callables that run on the loop thread once the
    work has ended, whether it succeeded, failed, or was detached meanwhile (a
    stop cancels a start, a shutdown takes the child): its ``done`` report runs
    only while it is still the model's operation, its cleanup always
    (``workers.OpRunner``). State the operation set up on the model (a pin, a
    reply to answer) is undone there, never only in the report.
    """

    op_id: int
    kind: str
    child: Any = None             # set by the worker as soon as it spawns
    cancelled: bool = False
    kill: bool = False            # cancelled by a kill: the worker SIGKILLs its child
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    # Set by the worker thread when its work returned (before the report is posted):
    # a stop that detached this operation waits for it, so a child the worker was
    # still spawning cannot outlive the stop (workers.OpRunner).
    ended: threading.Event = field(default_factory=threading.Event)

    def on_cleanup(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread when this operation ends, whatever the path."""
        self.cleanups.append(fn)

    def detach(self, kill: bool = False) -> None:
        """Cancel: the worker stops as soon as it can; its report will be ignored.

        With ``kill`` a child the worker started is SIGKILLed, not stopped gracefully.
        """
        self.cancelled = True
        self.kill = self.kill or kill


@dataclass
class ValidateJob:
    """A validate run on a supervised model: activate, clear the GPUs, drain, run."""

    levels: list[int]
    reply: Future[Any]
    demand: Future[Any]
    stage: str = "activate"          # activate -> exclusive -> drain -> running
    verbose: bool = False
    steps: list[str] = field(default_factory=list)
    drain_deadline: float = 0.0
    deadline: float = float("inf")   # the whole job's (validate_jobs.validate_timeout)
    error: Exception | None = None   # the answer once the deadline cut the run short


class ModelRuntime:
    """Mutable per-model state. Only the supervisor thread touches it."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.name = config.name
        self.state = ModelState.STOPPED
        self.state_since = time.time()
        self.state_since_mono = time.monotonic()
        self.child: Any = None            # llmuxd.child.ChildProcess while a process exists
        self.client: Any = None           # llmuxd.vllm_client.VllmClient for that child
        self.sleep_level: int | None = None
        self.op: Operation | None = None
        self.failures = 0
        self.backoff_until = 0.0
        self.last_error: str | None = None
        self.last_switch: SwitchRecord | None = None
        self.switch: SwitchRecord | None = None          # the switch in progress, if any
        self.preflight_started: float | None = None     # monotonic, while a preflight runs
        self.restarts = 0
        self.starts = 0
        self.active_since: float | None = None
        self.demands: list[Future[Any]] = []              # waiting for ACTIVE
        self.demand_since: float | None = None
        self.sleepers: list[Future[Any]] = []             # waiting for asleep/stopped
        self.drain_deadline: float | None = None
        self.drain_started: float | None = None
        self.drain_level: int = 3
        self.drain_was: float | None = None               # active_since before the drain
        self.pending_config: ModelConfig | None = None    # reload changed it: apply when stopped
        self.removed = False
        self.pinned = False                               # validate runs: do not evict
        self.validate_job: ValidateJob | None = None
        self.gpu_memory_mib: dict[int, int] = {}
        # What its operations took (EMA per kind: start, wake1, wake2, sleep1, sleep2,
        # stop), so a policy can price a switch before that direction was ever measured.
        self.learned: dict[str, float] = {}
        self.switched_in_secs = 0.0       # GPU time of the switch that made it ACTIVE
        # Upkeep and host memory (upkeep.py, host_memory.py), loop thread only.
        self.idle_since: float | None = None        # ACTIVE, nothing in flight or waiting
        self.last_used: float | None = None         # last seen holding a lease (monotonic)
        self.prewarm: str | None = None             # prewarm progress, for status
        self.host_memory_bytes: int | None = None   # RSS of its process tree (sampled)
        self.l1_host: tuple[str, int] | None = None  # (model_path, bytes its L1 sleep took)

    @property
    def level(self) -> int:
        return self.config.sleep_level

    def enter(self, new: ModelState, reason: str) -> None:
        """Move to ``new`` (checked against the table) and log why."""
        old = self.state
        check_transition(old, new)
        self.state = new
        self.state_since = time.time()
        self.state_since_mono = time.monotonic()
        if new is ModelState.ACTIVE:
            self.active_since = self.state_since_mono
            self.sleep_level = None
        elif new is not ModelState.DRAINING:
            self.active_since = None
        if new in (ModelState.STOPPED, ModelState.BACKOFF, ModelState.FAILED):
            self.sleep_level = None
        log.info("transition", model=self.name, from_state=str(old), to_state=str(new),
                 reason=reason)

    @property
    def busy(self) -> bool:
        return self.op is not None

    def learn(self, kind: str, seconds: float) -> None:
        """Fold one measured operation into its running average (EMA, alpha 0.3)."""
        old = self.learned.get(kind)
        self.learned[kind] = seconds if old is None else (
            LEARN_ALPHA * seconds + (1 - LEARN_ALPHA) * old)

    def expected_in_secs(self) -> float | None:
        """Seconds to become ACTIVE from where it is now (None: never measured)."""
        if self.state is ModelState.SLEEPING:
            return self.learned.get(f"wake{self.sleep_level or self.config.sleep_level}")
        if self.state in (ModelState.STOPPED, ModelState.BACKOFF, ModelState.FAILED):
            return self.learned.get("start")
        return 0.0 if self.state is ModelState.ACTIVE else None

    def expected_out_secs(self) -> float | None:
        """Seconds to leave the GPU at its configured level (None: never measured)."""
        level = self.config.sleep_level
        return self.learned.get("stop" if level == 3 else f"sleep{level}")


def settle(futures: list[Future[Any]], error: Exception | None,
           m: ModelRuntime | None = None) -> None:
    """Answer every future in ``futures`` (and empty it): ``error``, or else ``m``.

    A model's ``demands`` (waiting for ACTIVE) and ``sleepers`` (waiting for it to
    leave its GPUs) are answered this way; futures already answered are skipped.
    """
    pending, futures[:] = list(futures), []
    for fut in pending:
        if fut.done():
            continue
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(m)
