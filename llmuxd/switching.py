"""The switch operations on the model table: activate, start, wake, drain, sleep, stop, reap.

Each changes a model's state on the loop thread (``ModelRuntime.enter``), moves its
lease gate, and hands the slow part to a worker (``OpRunner.launch`` with a
function of child_ops.py); the ``_done`` methods take the result back. They also
keep the switch records (who left, who came, each phase's time) and learn what a
switch costs, which the planner passes to the policy.

What this layer does not decide: which model should come or go (the planner,
above, asks the policy and calls ``activate``/``deactivate``), and what to do when
a preflight finds too little free memory (``no_room``, the planner's
``make_room``, wired in by the supervisor). A pending config is applied when an
operation ends by the runner's ``on_end`` (``apply_pending``), in one place.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from llmuxd.child_ops import (
    TAIL_LINES,
    OpFailed,
    memory_free_for,
    sleep_child,
    start_child,
    stop_child,
    wake_child,
)
from llmuxd.config import ModelConfig
from llmuxd.core import Core
from llmuxd.errors import ApiError
from llmuxd.hostmem import tree_rss
from llmuxd.leases import GateView
from llmuxd.model import ModelRuntime, Operation, SwitchRecord, settle
from llmuxd.states import HAS_PROCESS, ModelState
from llmuxd.workers import OpRunner

log = structlog.get_logger("llmuxd.supervisor")
S = ModelState

COST_ALPHA = 0.3
# What a reload may change on a model without restarting its child: names clients
# use (resolved from the config at each request), the level of its next sleep, and
# a timeout that only a future start reads.
IN_PLACE = ("aliases", "sleep_level", "startup_timeout_secs",
            "prewarm", "idle_sleep_secs", "keep_active")
# Operations that bring a model in: a reload that changes or removes the model
# cancels them (their child would serve the old config, or nobody).
COMING_IN = ("preflight", "start", "wake")


def needs_restart(old: ModelConfig, new: ModelConfig) -> bool:
    """True when ``new`` differs from ``old`` in more than the IN_PLACE fields."""
    same = {name: getattr(old, name) for name in IN_PLACE}
    return dataclasses.replace(new, **same) != old


class Switcher:
    """Runs the operations that move models between states (loop thread only)."""

    def __init__(self, core: Core, runner: OpRunner,
                 gpu_changed: Callable[[], None]) -> None:
        self.core = core
        self.runner = runner
        self.gpu_changed = gpu_changed          # sample GPU memory soon
        # Preflight found too little memory: True if waiting is useful (planner).
        self.no_room: Callable[[ModelRuntime, str], bool] = lambda _m, _why: False
        # The level an L1 sleep really gets (host-RAM budget), and what it took after.
        self.choose_level: Callable[[ModelRuntime, int], int] = lambda _m, level: level
        self.slept: Callable[[ModelRuntime, int, int | None, int | None], None] = \
            lambda _m, _level, _before, _after: None

    # ------------------------------------------------------------------
    # Switch records

    def new_switch(self, to: str | None, from_: list[str] | None = None) -> SwitchRecord:
        """A switch starting now: to ``to`` (None: a model only leaves), from ``from_``."""
        return SwitchRecord(to=to, from_=list(from_ or []), started_at=time.time(),
                            started_mono=time.monotonic())

    def finish_switch(self, m: ModelRuntime, result: str) -> None:
        """End m's switch: record it (log, metrics, last_switch) and learn its cost."""
        sw = m.switch
        m.switch = None
        if sw is None:
            return
        sw.finish(result)
        m.last_switch = sw
        for name in sw.from_:
            other = self.core.models.get(name)
            if other is not None:
                other.last_switch = sw
        self._record_switch(sw)
        if result == "ok" and sw.total_ms is not None:
            # What the switch cost the GPU: everything but the drain (which still serves).
            secs = max(0.0, sw.total_ms - sw.phases_ms.get("drain", 0.0)) / 1000
            m.switched_in_secs = secs
            costs = self.core.costs
            key = (sw.from_[0] if sw.from_ else None, m.name)
            old = costs.get(key)
            costs[key] = secs if old is None else COST_ALPHA * secs + (1 - COST_ALPHA) * old

    def _record_switch(self, sw: SwitchRecord) -> None:
        d = sw.to_dict()
        log.info("switch", from_model=d["from"], to_model=d["to"], result=d["result"],
                 total_ms=d["total_ms"], **{f"{k}_ms": v for k, v in d["phases_ms"].items()})
        self.core.metrics.switch(d["from"] or "", d["to"] or "", d["result"],
                                 (d["total_ms"] or 0.0) / 1000, sw.phases_ms)

    # ------------------------------------------------------------------
    # Coming in: preflight, start, wake

    def activate(self, m: ModelRuntime, reason: str) -> None:
        """Start or wake ``m``: first check that its memory is free (in a worker)."""
        if m.state not in (S.STOPPED, S.BACKOFF, S.SLEEPING):
            return
        if m.switch is None:
            m.switch = self.new_switch(m.name)
        probe = self.core.probe
        gpus = m.config.gpu_indices
        util = m.config.gpu_memory_utilization
        sleeper = m.child if m.state is S.SLEEPING else None
        m.preflight_started = time.monotonic()
        self.runner.launch(m, "preflight",
                           lambda _op: memory_free_for(probe, gpus, util, sleeper),
                           self._preflight_done)

    def _preflight_done(self, m: ModelRuntime, _op: Operation, result: Any,
                        error: BaseException | None) -> None:
        if self.core.shutdown is not None or m.removed:
            return
        if m.switch is not None and m.preflight_started is not None:
            # The GPU check and its two hand-offs: part of the switch, so in its line.
            m.switch.add("preflight", time.monotonic() - m.preflight_started)
        m.preflight_started = None
        ok, why = (True, "") if error is not None else result
        if error is not None:
            log.warning("gpu_check_failed", model=m.name, error=str(error))
        if not ok:
            if self.no_room(m, why):
                return
            self.start_failed(m, f"not enough free GPU memory for '{m.name}': {why}")
            return
        if m.state is S.SLEEPING:
            self._wake(m)
        elif m.state in (S.STOPPED, S.BACKOFF):
            self._start(m)

    def _start(self, m: ModelRuntime) -> None:
        core = self.core
        cfg = core.config
        mc = m.config
        guardian = core.guardian
        log_dir = Path(cfg.daemon.log_dir)
        on_line = _child_logger(mc.name) if cfg.vllm_logging else None
        m.backoff_until = 0.0
        m.enter(S.STARTING, "requests waiting" if not m.demands else "start requested")
        self.runner.launch(
            m, "start", lambda op: start_child(op, cfg, mc, log_dir, on_line, guardian),
            self._start_done)

    def _start_done(self, m: ModelRuntime, _op: Operation, result: Any,
                    error: BaseException | None) -> None:
        if error is not None:
            if self.core.shutdown is not None:
                if m.state is S.STARTING:
                    m.enter(S.STOPPED, "start cancelled by shutdown")
                return
            msg = str(error) if isinstance(error, OpFailed) else f"start failed: {error!r}"
            if not isinstance(error, OpFailed):
                log.error("start_crashed", model=m.name, exc_info=error)
            self.start_failed(m, msg)
            return
        child, client, phases = result
        m.child, m.client = child, client
        m.starts += 1
        if m.starts > 1:
            m.restarts += 1
        m.failures = 0
        m.last_error = None
        if m.switch is not None:
            for phase, secs in phases.items():
                m.switch.add(phase, secs)
        m.learn("start", sum(phases.values()))
        m.enter(S.ACTIVE, f"healthy (pid {child.pid})")
        self.became_active(m)

    def failed_error(self, m: ModelRuntime) -> ApiError:
        return ApiError("model_failed", f"model '{m.name}' is held failed after "
                        f"{m.failures} failed starts (clear with start or reload): "
                        f"{m.last_error}", model=m.name)

    def start_failed(self, m: ModelRuntime, msg: str) -> None:
        """A start (or a wake without room) failed: refuse waiters, back off or hold FAILED."""
        core = self.core
        m.last_error = msg
        err = ApiError("model_failed", msg, model=m.name)
        core.leases.refuse(m.name, err)
        settle(m.demands, err)
        m.demand_since = None
        self.finish_switch(m, "failed")
        if m.state is S.SLEEPING:       # no room to wake it: it stays asleep
            log.error("wake_refused", model=m.name, error=msg)
            return
        m.failures += 1
        log.error("start_failed", model=m.name, failures=m.failures, error=msg)
        limit = core.config.daemon.max_start_failures
        if m.failures >= limit:
            if m.state is not S.FAILED:
                m.enter(S.FAILED, f"{m.failures} failed starts in a row")
            core.leases.set_hold(m.name, self.failed_error(m))
        else:
            delay = core.config.daemon.restart_backoff_secs * 2 ** (m.failures - 1)
            m.backoff_until = time.monotonic() + delay
            if m.state is not S.BACKOFF:
                m.enter(S.BACKOFF, f"start failed; next try in {delay:g}s")

    def refuse_failed(self) -> None:
        """Models held FAILED: refuse whatever waits for them (each loop pass)."""
        for m in self.core.models.values():
            if m.state is S.FAILED:
                err = self.failed_error(m)
                self.core.leases.refuse(m.name, err)
                settle(m.demands, err)
                m.demand_since = None

    def _wake(self, m: ModelRuntime) -> None:
        cfg = self.core.config
        level = m.sleep_level or m.config.sleep_level
        client = m.client
        name = m.name
        m.enter(S.WAKING, f"waking from level {level}")
        self.runner.launch(m, "wake", lambda _op: wake_child(client, name, level, cfg),
                           self._wake_done)

    def _wake_done(self, m: ModelRuntime, _op: Operation, result: Any,
                   error: BaseException | None) -> None:
        if error is not None:
            msg = str(error)
            m.last_error = msg
            log.error("wake_failed", model=m.name, error=msg)
            err = ApiError("model_failed", msg + "; the model was stopped, the next "
                           "request starts it cold", model=m.name)
            self.core.leases.refuse(m.name, err)
            settle(m.demands, err)
            m.demand_since = None
            self.finish_switch(m, "failed")
            self.stop_model(m, "wake failed: stopping (L3)")
            return
        if m.switch is not None:
            for phase, secs in result.items():
                m.switch.add(phase, secs)
        m.learn(f"wake{m.sleep_level or m.config.sleep_level}", sum(result.values()))
        m.enter(S.ACTIVE, "awake")
        self.became_active(m)

    def became_active(self, m: ModelRuntime) -> None:
        """m is ACTIVE: open its gate (grants its waiters), answer demands, end the switch.

        Not when a reload removed or changed m while it was coming up: a lease granted
        now would be revoked a moment later, when ``apply_pending`` (the runner's
        ``on_end``, right after) stops this child. Its waiters wait for the next one.
        """
        if m.removed or m.pending_config is not None:
            log.info("activation_superseded", model=m.name,
                     reason="removed by reload" if m.removed else "config changed by reload")
            return
        leases = self.core.leases
        leases.set_hold(m.name, None)
        granted = leases.open_gate(m.name)
        settle(m.demands, None, m)
        m.demand_since = None
        self.finish_switch(m, "ok")
        self.gpu_changed()
        log.info("model_active", model=m.name, granted=granted)

    # ------------------------------------------------------------------
    # Leaving: drain, sleep, stop

    def deactivate(self, m: ModelRuntime, level: int, drain: bool, reason: str,
                   drain_secs: float | None = None) -> None:
        """ACTIVE → DRAINING: close the gate; the drain ends at 0 in flight or the timeout.

        ``drain_secs`` caps the drain below ``daemon.drain_timeout_secs`` (the planner
        ends it in time for the waiters it makes room for, see planner.drain_cap).
        """
        if m.state is not S.ACTIVE or m.busy:
            return
        in_flight = self.core.leases.close_gate(m.name)
        now = time.monotonic()
        limit = self.core.config.daemon.drain_timeout_secs
        if drain_secs is not None:
            limit = max(0.0, min(limit, drain_secs))
        m.drain_started = now
        m.drain_deadline = now + (limit if drain else 0.0)
        m.drain_was = m.active_since
        m.drain_level = level
        m.enter(S.DRAINING, f"{reason} (level {level}, {in_flight} in flight)")
        self.core.kick()  # progress the drain on the next pass, not a TICK later

    def progress_drains(self, now: float) -> None:
        """Each loop pass: a drain that reached 0 in flight (or its deadline) sleeps or stops."""
        gates = self.core.leases.view()
        for m in list(self.core.models.values()):
            if m.state is not S.DRAINING or m.busy or m.drain_deadline is None:
                continue
            gate = gates.get(m.name)
            in_flight = gate.in_flight if gate else 0
            if self._nobody_waits_for(m, gates):
                self._cancel_drain(m, in_flight)
                continue
            if in_flight and now < m.drain_deadline:
                continue
            drained = now - (m.drain_started or now)
            if in_flight and m.drain_deadline > (m.drain_started or 0.0):
                log.warning("drain_timeout", model=m.name, in_flight=in_flight,
                            waited_s=round(drained, 3))
                # Stop counting what the drain gave up on (issue 12): else the next
                # drain of this model waits the full timeout for the same leases.
                self.core.leases.revoke(m.name, f"drain timed out after {drained:.1f}s")
            elif in_flight:
                log.info("no_drain", model=m.name, in_flight=in_flight,
                         reason="drain_before_switch = false")
            if m.switch is not None:
                m.switch.add("drain", drained)
            m.drain_deadline = None
            if m.drain_level == 3 or self.core.shutdown is not None:
                self.stop_model(m, f"level 3 after drain ({in_flight} still in flight)")
            else:
                self._sleep(m, self.choose_level(m, m.drain_level))

    def _nobody_waits_for(self, m: ModelRuntime, gates: dict[str, GateView]) -> bool:
        """m drains to make room for another model that no one waits for any more."""
        sw = m.switch
        if self.core.shutdown is not None or sw is None or sw.to in (None, m.name):
            return False
        target = self.core.models.get(sw.to or "")
        if target is None or target.busy or target.switch is not sw \
                or target.state not in (S.STOPPED, S.SLEEPING, S.BACKOFF):
            return False
        gate = gates.get(target.name)
        return not (gate.queued if gate else 0) and not target.demands

    def _cancel_drain(self, m: ModelRuntime, in_flight: int) -> None:
        """Call a drain off: its model serves again instead of sleeping for nobody."""
        sw = m.switch
        target = self.core.models.get(sw.to or "") if sw is not None else None
        log.info("drain_cancelled", model=m.name, for_model=sw.to if sw else None,
                 in_flight=in_flight, reason="nobody waits for it any more")
        since = m.drain_was
        m.drain_deadline = None
        m.switch = None
        m.enter(S.ACTIVE, f"drain cancelled: nobody waits for {sw.to if sw else '?'} any more")
        m.active_since = since if since is not None else m.active_since
        self.core.leases.open_gate(m.name)
        if target is not None and target.switch is sw:
            self.finish_switch(target, "abandoned")

    def _sleep(self, m: ModelRuntime, level: int) -> None:
        core = self.core
        cfg = core.config
        client, child, probe = m.client, m.child, core.probe
        timeout = cfg.daemon.sleep_timeout_secs
        residue = cfg.daemon.sleep_residue_mib
        gpus = m.config.gpu_indices

        measure = level == 1 and child is not None     # what its host copy takes

        def work(_op: Operation) -> Any:
            t0 = time.monotonic()
            before = tree_rss(child.pid) if measure else None
            t1 = time.monotonic()
            phases = sleep_child(client, child, probe, gpus, level, timeout, residue)
            t2 = time.monotonic()
            after = tree_rss(child.pid) if measure else None
            if measure:   # what learning the L1 host copy costs the switch
                phases["hostmem"] = (t1 - t0) + (time.monotonic() - t2)
            return phases, before, after
        self.runner.launch(m, f"sleep{level}", work,
                           lambda mm, _op, res, err: self._sleep_done(mm, level, res, err))

    def _sleep_done(self, m: ModelRuntime, level: int, result: Any,
                    error: BaseException | None) -> None:
        if error is not None:
            msg = f"{error}; escalating to level 3 (stop)"
            m.last_error = msg
            log.warning("sleep_failed", model=m.name, sleep_level=level, error=str(error))
            self.core.metrics.sleep_failed(m.name)
            self.stop_model(m, msg)
            return
        phases, before, after = result
        if m.switch is not None:
            for phase, secs in phases.items():
                m.switch.add(phase, secs)
        m.learn(f"sleep{level}", sum(v for k, v in phases.items() if k != "hostmem"))
        m.enter(S.SLEEPING, f"asleep at level {level}")
        m.sleep_level = level
        self._left_gpu(m)
        self.slept(m, level, before, after)

    def stop_model(self, m: ModelRuntime, reason: str, kill: bool = False) -> None:
        """Any state with a process → STOPPING → (worker: SIGTERM, grace, SIGKILL) → STOPPED.

        An operation still running is detached (cancelled): its report is ignored,
        its worker stops its own child (SIGKILL for a kill), its cleanups still run,
        and this stop waits for it (``stop_child``), so that STOPPED means no child.
        """
        child = m.child
        detached = m.op
        if detached is not None:
            detached.detach(kill=kill)
            m.op = None
        if m.state not in HAS_PROCESS:
            return
        if m.state is not S.STOPPING:
            m.enter(S.STOPPING, reason)
        leases = self.core.leases
        leases.close_gate(m.name)
        revoked = leases.revoke(m.name, reason)
        if revoked:
            log.warning("leases_revoked", model=m.name, count=len(revoked), reason=reason)
        grace = 0.0 if kill else self.core.config.daemon.stop_timeout_secs
        self.runner.launch(m, "stop", lambda _op: stop_child(child, grace, kill, detached),
                           self._stop_done)

    def _stop_done(self, m: ModelRuntime, _op: Operation, result: Any,
                   error: BaseException | None) -> None:
        secs, rc = result if error is None else (0.0, None)
        if error is not None:
            log.error("stop_failed", model=m.name, error=repr(error))
        if m.switch is not None:
            m.switch.add("sleep", secs)
        if error is None and m.state is S.STOPPING:
            m.learn("stop", secs)
        m.child = None
        m.client = None
        m.enter(S.STOPPED, f"process ended (exit code {rc})")
        self._left_gpu(m)

    def _left_gpu(self, m: ModelRuntime) -> None:
        """m left its GPUs: answer its sleepers, close a switch it was the only subject of."""
        settle(m.sleepers, None, m)
        self.gpu_changed()
        sw = m.switch
        m.switch = None
        if sw is not None and sw.to is None:
            sw.finish("ok")
            self._record_switch(sw)
            m.last_switch = sw
        elif sw is not None:
            m.last_switch = sw

    # ------------------------------------------------------------------
    # A pending config (reload), and children that died on their own

    def reconfigure(self, m: ModelRuntime, new: ModelConfig) -> None:
        """A reload gave m ``new``: apply it in place, or restart m with it.

        Only IN_PLACE fields changed (aliases, sleep level): m keeps its child, its
        leases and its state. Anything else: ``new`` waits in ``pending_config``, a
        start or wake in progress (old config) is cancelled, and ``apply_pending``
        drains and stops m; it starts again with ``new`` when a request comes.
        """
        if not needs_restart(m.config, new):
            changed = sorted(k for k in IN_PLACE if getattr(m.config, k) != getattr(new, k))
            m.config, m.pending_config = new, None
            log.info("model_config_applied", model=m.name, in_place=changed)
        else:
            m.pending_config = new
            self.cancel_coming_in(m, "config changed by reload")
        self.apply_pending(m)

    def cancel_coming_in(self, m: ModelRuntime, why: str) -> None:
        """Cancel a preflight, start or wake of m (a reload made it pointless).

        Its waiters and demands stay: a changed model serves them from its new child.
        """
        if m.op is not None and m.op.kind in COMING_IN:
            log.info("start_cancelled", model=m.name, op=m.op.kind, reason=why)
            self.stop_model(m, f"{why}: {m.op.kind} cancelled")

    def apply_pending(self, m: ModelRuntime) -> None:
        """m is idle: removed or changed by a reload meanwhile? act on it now.

        An active model drains first (``drain_timeout_secs``, whatever
        ``drain_before_switch`` says: a reload is not a switch) and is then stopped;
        a draining one stops instead of sleeping; one without a process is forgotten
        (removed) or takes its new config. Called when an operation of m ends
        (``OpRunner``'s ``on_end``) and by the reload itself.
        """
        if m.busy:
            return
        core = self.core
        if not m.removed and m.pending_config is None:
            return
        why = "removed by reload" if m.removed else "config changed by reload"
        if m.state is S.ACTIVE:
            self.deactivate(m, 3, True, why)
        elif m.state is S.DRAINING:
            m.drain_level = 3           # stop, not sleep, once drained
        elif m.state in HAS_PROCESS:
            self.stop_model(m, why)
        elif m.removed:
            core.models.pop(m.name, None)
            settle(m.sleepers, None, m)
            log.info("model_removed", model=m.name)
        elif m.pending_config is not None:
            m.config, m.pending_config = m.pending_config, None
            core.leases.add_model(m.name, m.config.upstream, m.name)
            log.info("model_config_applied", model=m.name)

    def child_hung(self, name: str, pid: int, why: str) -> None:
        """The watchdog found m's child hung: SIGKILL its group; the next request restarts it.

        Its leases are revoked with the reason (a release then says why), so the front
        end's requests to it end at once: their upstream connections break with the
        kill and they get 502 naming the hang. Waiters stay queued and get the fresh
        child. A report about a child that is gone or being operated on is stale.
        """
        m = self.core.models.get(name)
        if m is None or m.child is None or m.child.pid != pid or m.busy:
            log.info("hang_report_ignored", model=name, pid=pid, why=why)
            return
        reason = f"'{name}' (pid {pid}) hung: {why}; its process group was killed"
        m.last_error = reason
        log.error("child_hung", model=name, pid=pid, why=why, state=str(m.state))
        self.core.metrics.child_hung(name)
        if m.switch is not None and m.switch.to == m.name:
            self.finish_switch(m, "failed")
        self.stop_model(m, reason, kill=True)

    def reap(self) -> None:
        """Children that exited on their own: revoke, refuse, stop the rest of the group.

        Each loop pass. The model is STOPPING until its group is gone, then STOPPED.
        """
        core = self.core
        for m in list(core.models.values()):
            if m.busy or m.child is None:
                continue
            rc = m.child.poll()
            if rc is None:
                continue
            child = m.child
            m.client = None
            tail = child.tail(TAIL_LINES)
            msg = f"'{m.name}' (pid {child.pid}) exited unexpectedly with code {rc}"
            m.last_error = msg + ("; last log lines:\n" + "\n".join(tail) if tail else "")
            if core.shutdown is None:
                log.error("child_died", model=m.name, pid=child.pid, code=rc)
            else:       # e.g. systemd's KillMode=control-group signalled it too
                log.info("child_exited_during_shutdown", model=m.name, pid=child.pid, code=rc)
            core.leases.close_gate(m.name)
            revoked = core.leases.revoke(m.name, msg)
            err = ApiError("model_failed", msg + "; the next request restarts it",
                           model=m.name)
            core.leases.refuse(m.name, err)
            settle(m.demands, err)
            m.demand_since = None
            m.drain_deadline = None
            if revoked:
                log.warning("leases_revoked", model=m.name, count=len(revoked), reason=msg)
            if m.switch is not None and m.switch.to == m.name:
                self.finish_switch(m, "failed")
            # What is left of the group (engine workers that outlived the leader) is
            # stopped by an operation like any stop: the model is STOPPING until the
            # group is gone (a restart must not race its memory), a shutdown waits for
            # it, and its end applies a pending config.
            if m.state is not S.STOPPING:
                m.enter(S.STOPPING, f"child exited with code {rc}")
            grace = core.config.daemon.stop_timeout_secs
            self.runner.launch(m, "stop", _stop_rest(child, grace), self._stop_done)


def _stop_rest(child: Any, grace: float) -> Callable[[Operation], Any]:
    """The work that stops what is left of a dead child's group (bound per child)."""
    return lambda _op: stop_child(child, grace, False)


def _child_logger(model: str) -> Callable[[str], None]:
    child_log = structlog.get_logger("vllm")

    def on_line(line: str) -> None:
        child_log.info("child_output", model=model, line=line.rstrip("\n"))
    return on_line
