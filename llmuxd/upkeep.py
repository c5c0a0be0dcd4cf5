"""Upkeep of the model table between requests: idle TTL, keep-active, prewarm.

The policy (policy/) decides who comes and goes when requests wait; these are the
decisions the daemon makes when nobody waits, each pass of the loop:

* activity: from the lease gates, when each model was last used and since when an
  ACTIVE model has been idle (nothing in flight, nobody waiting, since its last
  release or since it became active).
* idle TTL (``idle_sleep_secs``): an ACTIVE model idle that long goes to sleep at
  its level (drained first), so its GPU is free before the next model is asked for.
* keep-active (``keep_active``): such a model is started at boot and brought back
  whenever it is down (a crash, a failed wake, a validate run that evicted it): a
  standing demand, the same as ``llmuxctl start`` would make, so the policy places it.
  Policies never choose it as a victim (``ModelView.always_active``), nor does
  ``Planner.make_room``; an operator's ``sleep`` of it is refused. The config check
  makes sure keep-active models fit together and leave room for every other model.
* prewarm (``prewarm``): at boot (and after a reload added or changed such a model)
  each one is started and put to sleep at its level, in config order, one at a
  time, only while no request waits for any model and nothing else is moving, and
  only where it fits beside what is on the GPUs; so its first request is a wake,
  not a cold start. A request for it meanwhile simply wins: it stays active.

The rules are pure functions of small fact records (``idle_expired``,
``prewarm_step``); ``Upkeep`` reads the model table into them and acts through the
switching layer, like the planner does with the policy.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from typing import Any

import structlog
from prometheus_client import Counter, Gauge

from llmuxd.config import ModelConfig
from llmuxd.core import Core
from llmuxd.leases import GateView
from llmuxd.model import ModelRuntime
from llmuxd.placement import Placed, fits
from llmuxd.states import ModelState
from llmuxd.switching import Switcher

log = structlog.get_logger("llmuxd.supervisor")
S = ModelState
HOLDING = frozenset({S.ACTIVE, S.DRAINING, S.STARTING, S.WAKING, S.STOPPING})


# ---------------------------------------------------------------------------
# Activity (loop thread)


def track_activity(models: dict[str, ModelRuntime], gates: dict[str, GateView],
                   now: float) -> None:
    """Update each model's ``last_used`` and ``idle_since`` from its lease gate.

    The gate stamps its last grant and release (``last_use``), so a request that
    came and went between two passes counts, and idle time runs from its end.
    """
    for name, m in models.items():
        gate = gates.get(name)
        in_flight = gate.in_flight if gate else 0
        queued = (gate.queued if gate else 0) + len(m.demands)
        last = gate.last_use if gate is not None and gate.last_use > 0 else None
        if in_flight:
            m.last_used = now
        elif last is not None and (m.last_used is None or last > m.last_used):
            m.last_used = last
        if m.state is S.ACTIVE and not m.busy and not in_flight and not queued:
            m.idle_since = max(last or 0.0, m.active_since or 0.0)
        else:
            m.idle_since = None


# ---------------------------------------------------------------------------
# Pure rules


@dataclass(frozen=True)
class IdleFacts:
    """What the idle TTL rule needs to know of one model."""

    name: str
    state: ModelState
    busy: bool
    idle_since: float | None
    idle_sleep_secs: float          # 0: never
    keep_active: bool
    pinned: bool


def idle_expired(facts: list[IdleFacts], now: float) -> list[str]:
    """The ACTIVE models idle for at least their ``idle_sleep_secs``."""
    return [f.name for f in facts
            if f.idle_sleep_secs > 0 and f.state is S.ACTIVE and not f.busy
            and not f.keep_active and not f.pinned and f.idle_since is not None
            and now - f.idle_since >= f.idle_sleep_secs]


@dataclass(frozen=True)
class PrewarmFacts:
    """The model being prewarmed, and whether the box is quiet enough to go on."""

    state: ModelState
    busy: bool
    traffic: bool                   # in flight, waiting, or used since the prewarm began
    anyone_waiting: bool            # some model has waiters or demands
    others_moving: bool             # another model runs an operation or is in transition
    fits: bool                      # placement: it fits beside what holds its GPUs
    blocking: tuple[str, ...] = ()  # who holds its GPUs (for the status line)


class Stage(Enum):
    """Where the prewarm of one model is: PENDING -> STARTING -> SLEEPING (-> next)."""

    PENDING = "pending"       # not started by us yet
    STARTING = "starting"     # we asked for a start (preflight, start)
    SLEEPING = "sleeping"     # we asked it to drain and sleep


def prewarm_step(stage: Stage, f: PrewarmFacts) -> tuple[str, str]:
    """(action, note) for the model being prewarmed at ``stage``.

    Actions: "wait", "start" (PENDING -> STARTING), "sleep" (STARTING -> SLEEPING),
    "done", "skip" (the model is finished with; the note says how).
    """
    if stage is Stage.PENDING:
        if f.state is not S.STOPPED:
            return "done", f"nothing to do: already {f.state}"
        if f.busy or f.anyone_waiting or f.others_moving:
            return "wait", "waiting for a quiet moment (requests or switches in progress)"
        if not f.fits:
            return "wait", "waiting for room: " + ", ".join(f.blocking) + " on its GPUs"
        return "start", "starting"
    if f.busy or f.state in (S.STARTING, S.WAKING, S.DRAINING, S.STOPPING):
        return "wait", stage.value
    if stage is Stage.STARTING:
        if f.state is S.ACTIVE:
            if f.traffic:
                return "done", "in use: left active"
            return "sleep", "going to sleep"
        if f.state in (S.BACKOFF, S.FAILED):
            return "skip", "start failed"
        return "skip", f"did not start (now {f.state})"
    if f.state is S.SLEEPING:
        return "done", "asleep"
    return "done", f"left {f.state}"


# ---------------------------------------------------------------------------
# Acting on them (loop thread)


class UpkeepMetrics:
    """The upkeep series, on the daemon's registry."""

    def __init__(self, registry: Any) -> None:
        self.prewarms = Counter("llmux_prewarm_total", "Prewarms ended, by result "
                                "(asleep, in_use, skipped, nothing)", ["model", "result"],
                                registry=registry)
        self.pending = Gauge("llmux_prewarm_pending", "Prewarm models not done yet",
                             registry=registry)
        self.idle_sleeps = Counter("llmux_idle_sleeps_total", "Models put to sleep by "
                                   "idle_sleep_secs", ["model"], registry=registry)
        self.keep_active = Counter("llmux_keep_active_restarts_total", "keep_active models "
                                   "brought back after they stopped", ["model"],
                                   registry=registry)


class Upkeep:
    """Idle TTL, keep-active and prewarm, run once per loop pass after the planner."""

    def __init__(self, core: Core, ops: Switcher) -> None:
        self.core = core
        self.ops = ops
        self.metrics = UpkeepMetrics(core.metrics.registry)
        self.attempted: dict[str, ModelConfig] = {}   # model -> the config we prewarmed
        self.current: str | None = None
        self.stage = Stage.PENDING
        self.prewarm_began = 0.0

    # -- the loop's entry --------------------------------------------------

    def progress(self, now: float) -> None:
        core = self.core
        if core.shutdown is not None:
            return
        gates = core.leases.view()
        track_activity(core.models, gates, now)
        self._idle_ttl(now)
        self._keep_active(now)
        self._prewarm(gates)
        self.metrics.pending.set(len(self._pending_prewarms()) + (self.current is not None))

    # -- idle TTL ------------------------------------------------------------

    def _idle_ttl(self, now: float) -> None:
        facts = [IdleFacts(m.name, m.state, m.busy, m.idle_since, m.config.idle_sleep_secs,
                           m.config.keep_active, m.pinned)
                 for m in self.core.models.values() if not m.removed]
        for name in idle_expired(facts, now):
            m = self.core.models[name]
            ttl = m.config.idle_sleep_secs
            level = m.config.sleep_level
            log.info("idle_sleep", model=name, idle_s=round(now - (m.idle_since or now), 3),
                     idle_sleep_secs=ttl, sleep_level=level)
            m.switch = self.ops.new_switch(None, [name])
            self.ops.deactivate(m, level, True, f"idle for {ttl:g}s (idle_sleep_secs)")
            self.metrics.idle_sleeps.labels(name).inc()

    # -- keep-active -----------------------------------------------------------

    def _keep_active(self, now: float) -> None:
        for m in self.core.models.values():
            if (not m.config.keep_active or m.removed or m.busy or m.demands
                    or m.pending_config is not None
                    or m.state not in (S.STOPPED, S.SLEEPING, S.BACKOFF)):
                continue
            log.info("keep_active", model=m.name, state=str(m.state),
                     action="bringing it back")
            m.demands.append(Future())
            if m.starts:                        # not its first start: it came down
                self.metrics.keep_active.labels(m.name).inc()
            if m.demand_since is None:
                m.demand_since = now
            self.core.kick()

    # -- prewarm ---------------------------------------------------------------

    def _pending_prewarms(self) -> list[ModelRuntime]:
        """Prewarm models not yet tried with their current config, in config order."""
        out = []
        for name in self.core.config.models:
            m = self.core.models.get(name)
            if (m is None or m.removed or not m.config.prewarm or m.pending_config is not None
                    or self.attempted.get(name) is m.config):
                continue
            out.append(m)
        return out

    def _facts(self, m: ModelRuntime, gates: dict[str, GateView]) -> PrewarmFacts:
        models = self.core.models
        gate = gates.get(m.name)
        in_flight = gate.in_flight if gate else 0
        queued = (gate.queued if gate else 0) + len(m.demands)
        holders = [o for o in models.values()
                   if o is not m and not o.removed and (o.state in HOLDING or o.busy)
                   and set(o.config.gpu_indices) & set(m.config.gpu_indices)]
        began = self.prewarm_began if m.name == self.current else float("inf")
        return PrewarmFacts(
            state=m.state, busy=m.busy,
            traffic=bool(in_flight or queued or (gate is not None and gate.last_use > began)),
            anyone_waiting=any(
                (g.queued if (g := gates.get(o.name)) else 0) + len(o.demands) > 0
                for o in models.values() if not o.removed),
            others_moving=any(o is not m and (o.busy or o.state in (
                S.STARTING, S.WAKING, S.DRAINING, S.STOPPING)) for o in models.values()),
            fits=fits(_placed(m), [_placed(o) for o in holders]),
            blocking=tuple(sorted(o.name for o in holders)))

    def _prewarm(self, gates: dict[str, GateView]) -> None:
        """One step of the prewarm sequence: the model in progress, else the next one.

        The next one is the first pending model, in config order, that can go now: one
        waiting for room (its GPUs held) does not hold up the models behind it.
        """
        m = self.core.models.get(self.current) if self.current else None
        if m is not None and not m.removed:
            self._act(m, prewarm_step(self.stage, self._facts(m, gates)))
            return
        self.current = None
        for m in self._pending_prewarms():
            facts = self._facts(m, gates)
            action, note = prewarm_step(Stage.PENDING, facts)
            if action == "wait":
                self._note(m, note)
                if facts.fits:
                    return          # not quiet: the same for every model
                continue            # no room for this one: try the next
            self.attempted[m.name] = m.config
            self.current, self.stage = m.name, Stage.PENDING
            self.prewarm_began = time.monotonic()
            self._act(m, (action, note))
            return

    def _act(self, m: ModelRuntime, step: tuple[str, str]) -> None:
        action, note = step
        if action == "wait":
            self._note(m, note)
        elif action == "start":
            self._note(m, note, log_it=True)
            self.stage = Stage.STARTING
            self.ops.activate(m, "prewarm")
        elif action == "sleep":
            level = m.config.sleep_level
            self._note(m, f"going to sleep at level {level}", log_it=True)
            self.stage = Stage.SLEEPING
            m.switch = self.ops.new_switch(None, [m.name])
            self.ops.deactivate(m, level, True, f"prewarm: asleep at level {level} "
                                                "until its first request")
        else:
            result = "skipped" if action == "skip" else "in_use" if note.startswith("in use") \
                else "nothing" if note.startswith("nothing") else "asleep"
            if action == "done" and note == "asleep":
                note = f"done: asleep at level {m.sleep_level}"
            elif action == "skip":
                why = f": {m.last_error}" if m.last_error else ""
                note = f"skipped: {note}{why}"
            elif not note.startswith("nothing"):
                note = f"done: {note}"
            self._note(m, note, log_it=True)
            self.metrics.prewarms.labels(m.name, result).inc()
            self.current = None

    def no_room(self, m: ModelRuntime, why: str) -> bool | None:
        """A preflight of the model we prewarm found too little memory: give it up.

        None when this is not our prewarm (the planner's ``make_room`` decides);
        a prewarm never evicts anything.
        """
        if m.name != self.current or self.stage is not Stage.STARTING or m.demands:
            return None
        gates = self.core.leases.view()
        if gates.get(m.name) is not None and gates[m.name].queued:
            return None
        m.switch = None
        self._note(m, f"skipped: not enough free GPU memory ({why})", log_it=True)
        self.metrics.prewarms.labels(m.name, "skipped").inc()
        self.current = None
        return True

    def _note(self, m: ModelRuntime, note: str, log_it: bool = False) -> None:
        if log_it or m.prewarm != note:
            log.info("prewarm", model=m.name, step=note)
        m.prewarm = note

    def status(self) -> dict[str, Any]:
        """The ``upkeep`` part of ``/v1/status``."""
        models = self.core.models
        pending = [m.name for m in self._pending_prewarms()]
        return {
            "prewarm": {"current": self.current, "pending": pending,
                        "models": {n: m.prewarm for n, m in models.items()
                                   if m.prewarm is not None and not m.removed}},
            "keep_active": [n for n, m in models.items()
                            if m.config.keep_active and not m.removed],
            "idle_sleep_secs": {n: m.config.idle_sleep_secs for n, m in models.items()
                                if m.config.idle_sleep_secs and not m.removed},
        }


def _placed(m: ModelRuntime) -> Placed:
    return Placed(m.name, m.config.gpu_indices, m.config.gpu_memory_utilization)
