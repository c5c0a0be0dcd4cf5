"""The supervisor: one loop thread that owns every model's state.

Why one thread (the gunicorn-arbiter lesson): signal handlers, control-API
threads and worker threads never change model state themselves. They put a
callable on ``events`` and, when they need an answer, wait on a Future with a
timeout. The loop runs those callables, reaps children, progresses drains,
asks the policy what to do and launches operations. Everything that blocks
(spawn + /health, sleep, wake, stop, GPU reads) runs in a worker thread and
reports back with another callable, so the loop itself never waits on a child.

The one exception is the lease table (see leases.py): a lock-protected fast
path, so a request for an ACTIVE model never waits for this loop.

This module keeps the loop, scheduling and the switch operations' decisions. The
rest runs on the same thread from its own module: child_ops.py (the blocking work
of each operation), lifecycle.py (reload, shutdown), model_commands.py (start,
sleep, kill as asked), validate_jobs.py, status.py, frontend_keeper.py.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import psutil
import structlog

from llmuxd import __version__ as VERSION
from llmuxd import lifecycle
from llmuxd.child_ops import (
    TAIL_LINES,
    OpFailed,
    memory_free_for,
    sleep_child,
    start_child,
    stop_child,
    wake_child,
)
from llmuxd.config import Config, ModelConfig, load_config
from llmuxd.control.errors import ApiError, model_not_found, shutting_down
from llmuxd.frontend_keeper import FrontEndKeeper
from llmuxd.leases import LeaseTable
from llmuxd.lifecycle import ShutdownState
from llmuxd.metrics import Metrics
from llmuxd.model import ModelRuntime, OpContext, SwitchRecord, settle
from llmuxd.policy import make_policy
from llmuxd.policy.base import Activate, Deactivate, ModelView, PolicyInput
from llmuxd.sdnotify import SdNotify
from llmuxd.states import HAS_PROCESS, ModelState
from llmuxd.status import GpuSampler, active_line, daemon_status, model_status, update_gauges
from llmuxd.validate_jobs import ValidateJobs

log = structlog.get_logger("llmuxd.supervisor")
S = ModelState

TICK = 0.2                 # reap / drain / schedule at least this often
PID_SWEEP = 1.0            # check lease-holding client pids this often
COST_ALPHA = 0.3


class Supervisor:
    """Owns the models, the lease table's gates, the front end and the shutdown."""

    def __init__(self, config: Config, config_path: str, *, frontend: bool = True,
                 probe: Any = None, notifier: SdNotify | None = None,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.leases = LeaseTable(config.daemon.max_queue_per_model, self.kick)
        self.models: dict[str, ModelRuntime] = {}
        for mc in config.models.values():
            self.add_model(mc)
        self.policy = make_policy(config.policy.policy_type)
        self.probe = probe
        self.notifier = notifier or SdNotify()
        self.metrics = metrics or Metrics()
        self.guardian: Any = None
        self.server: Any = None
        self.want_frontend = frontend
        self.fe = FrontEndKeeper(self)
        self.validations = ValidateJobs(self)
        self.shutdown: ShutdownState | None = None
        self.done = False
        self.exit_code = 0
        self.costs: dict[tuple[str | None, str], float] = {}
        self.started_at = time.time()
        self.recheck_at: float | None = None
        self._op_ids = itertools.count(1)
        self._workers: set[threading.Thread] = set()
        self._workers_lock = threading.Lock()
        self._next_sweep = 0.0
        self._next_watchdog = 0.0
        self._watchdog_every = self.notifier.watchdog_interval()
        self._status_line = ""
        self.gpu_sampler = GpuSampler()
        self.ready = False
        self.loop_thread: threading.Thread | None = None

    # ------------------------------------------------------------------
    # Cross-thread entry points

    def kick(self) -> None:
        """Wake the loop (something changed: a waiter queued, a drain hit 0)."""
        self.events.put(None)

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (from workers; no answer expected)."""
        self.events.put(fn)

    def call(self, fn: Callable[[Future[Any]], None], timeout: float) -> Any:
        """Run ``fn(future)`` on the loop thread; wait for the future up to ``timeout``.

        ``fn`` may resolve the future at once or keep it until an operation ends.
        """
        fut: Future[Any] = Future()
        if self.done:
            raise shutting_down()
        self.events.put((fn, fut))
        try:
            return fut.result(timeout)
        except FutureTimeout:
            raise ApiError("timeout", f"no answer within {timeout:g}s") from None

    def query(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Run a read-only ``fn()`` on the loop thread and return its value."""
        def run(fut: Future[Any]) -> None:
            fut.set_result(fn())
        return self.call(run, timeout)

    def signal(self, signum: int) -> None:
        """Signal handler body: only queue it (SimpleQueue.put is reentrant)."""
        self.events.put(("signal", signum))

    # ------------------------------------------------------------------
    # The loop

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: self.signal(s))

    def run(self) -> int:
        """Run until shut down; returns the exit code."""
        self.loop_thread = threading.current_thread()
        try:
            self._boot()
        except BaseException:
            if self.server is not None:
                self.server.close()
            if self.guardian is not None:
                with contextlib.suppress(Exception):
                    self.guardian.close()
            raise
        while not self.done:
            timeout = TICK
            try:
                ev = self.events.get(timeout=timeout)
            except queue.Empty:
                ev = None
            while True:
                self._handle(ev)
                try:
                    ev = self.events.get_nowait()
                except queue.Empty:
                    break
            try:
                self._tick()
            except Exception:
                log.exception("tick_failed")
        lifecycle.finish(self)
        return self.exit_code

    def _handle(self, ev: Any) -> None:
        if ev is None:
            return
        try:
            if isinstance(ev, tuple) and len(ev) == 2 and ev[0] == "signal":
                self._on_signal(ev[1])
            elif isinstance(ev, tuple):
                fn, fut = ev
                if fut.done():
                    return
                try:
                    fn(fut)
                except ApiError as exc:
                    if not fut.done():
                        fut.set_exception(exc)
                except Exception as exc:
                    log.exception("command_failed")
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                ev()
        except Exception:
            log.exception("event_failed")

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            log.info("signal", signal="SIGHUP", action="reload")
            try:
                new = load_config(self.config_path)
            except Exception as exc:
                errors = getattr(exc, "errors", [str(exc)])
                log.error("reload_rejected", errors=errors)
                return
            self.reload(new)
        else:
            name = signal.Signals(signum).name
            self.begin_shutdown(f"{name} received")

    def _boot(self) -> None:
        from llmuxd.control.server import ControlServer
        from llmuxd.guardian import Guardian

        if self.probe is None:
            from llmuxd.gpu.select import make_probe_explained
            self.probe, why = make_probe_explained(self.config)
            log.info("gpu_probe", probe=self.probe.name, why=why)
        self.server = ControlServer(self, self.config.daemon)
        self.server.start()
        self.guardian = Guardian.start_new(grace=self.config.daemon.stop_timeout_secs)
        self.metrics.serve(self.config.metrics_port, self.probe)
        log.info("listening", socket=self.config.daemon.socket, pid=os.getpid(),
                 version=VERSION, models=sorted(self.models),
                 metrics_port=self.config.metrics_port)
        if self.want_frontend:
            self.fe.start()
        else:
            self.mark_ready()

    def mark_ready(self) -> None:
        if not self.ready:
            self.ready = True
            self.notifier.ready(active_line(self))
            log.info("ready")

    def _tick(self) -> None:
        now = time.monotonic()
        self._reap()
        self._progress_drains(now)
        if self.shutdown is not None:
            lifecycle.progress_shutdown(self, now)
        else:
            self._refuse_failed()
            self.validations.progress(now)
            self._schedule(now)
            self.fe.check(now)
        if now >= self._next_sweep:
            self._next_sweep = now + PID_SWEEP
            self._sweep_pids()
            for gone in self.leases.expire(self.config.daemon.max_lease_secs):
                log.warning("lease_expired", model=gone.model, lease=gone.lease_id,
                            pid=gone.pid)
            update_gauges(self)
        self.gpu_sampler.maybe_sample(self, now)
        if self._watchdog_every and now >= self._next_watchdog:
            self._next_watchdog = now + self._watchdog_every
            self.notifier.watchdog()
        status = active_line(self)
        if status != self._status_line and (self.notifier.status(status)
                                            or not self.notifier.enabled):
            self._status_line = status      # a message that found no room is sent again

    # ------------------------------------------------------------------
    # Models: add, views, policy

    def add_model(self, mc: ModelConfig) -> ModelRuntime:
        m = ModelRuntime(mc)
        self.models[mc.name] = m
        self.leases.add_model(mc.name, mc.upstream, mc.name)
        return m

    def resolve(self, name: str) -> str:
        """The model's own name for ``name`` (a name or alias), or model_not_found."""
        mc = self.config.resolve_model(name)
        if mc is None:
            raise model_not_found(name)
        return mc.name

    def _views(self, now: float) -> dict[str, ModelView]:
        gates = self.leases.view()
        views: dict[str, ModelView] = {}
        for name, m in self.models.items():
            if m.removed:
                continue
            gate = gates.get(name)
            queued = (gate.queued if gate else 0) + len(m.demands)
            waits = [t for t in (gate.oldest_wait if gate else None, m.demand_since)
                     if t is not None]
            views[name] = ModelView(
                name=name, state=m.state, busy=m.busy,
                in_flight=gate.in_flight if gate else 0, queued=queued,
                oldest_wait=min(waits) if waits else None, active_since=m.active_since,
                gpus=m.config.gpu_indices, fraction=m.config.gpu_memory_utilization,
                sleep_level=m.config.sleep_level, ready_at=m.backoff_until,
                pinned=m.pinned)
        return views

    def _schedule(self, now: float) -> None:
        views = self._views(now)
        for name, v in views.items():
            rt = self.models[name]
            if (rt.switch is not None and rt.switch.to == name and not v.queued
                    and not rt.busy and v.state in (S.STOPPED, S.SLEEPING, S.BACKOFF)):
                self.finish_switch(rt, "abandoned")    # its waiters gave up
        if not any(v.queued for v in views.values()):
            return
        inp = PolicyInput(models=views, now=now,
                          drain_before_switch=self.config.policy.drain_before_switch,
                          min_active_secs=self.config.policy.min_active_secs,
                          costs=dict(self.costs))
        decisions = self.policy.decide(inp)
        self.recheck_at = decisions.recheck_at
        for d in decisions.actions:
            m = self.models.get(d.model)
            if m is None or m.busy:
                continue
            if isinstance(d, Deactivate):
                if m.state is S.ACTIVE:
                    target = self.models.get(d.for_model or "")
                    if target is not None and target.switch is None:
                        target.switch = self.new_switch(target.name)
                    if target is not None and target.switch is not None \
                            and m.name not in target.switch.from_:
                        target.switch.from_.append(m.name)
                    m.switch = target.switch if target is not None else None
                    self.deactivate(m, d.level, d.drain, d.reason)
            elif isinstance(d, Activate):
                self._activate(m, d.reason)

    def _refuse_failed(self) -> None:
        for m in self.models.values():
            if m.state is S.FAILED:
                err = self._failed_error(m)
                self.leases.refuse(m.name, err)
                settle(m.demands, err)
                m.demand_since = None

    def _failed_error(self, m: ModelRuntime) -> ApiError:
        return ApiError("model_failed", f"model '{m.name}' is held failed after "
                        f"{m.failures} failed starts (clear with start or reload): "
                        f"{m.last_error}", model=m.name)

    def new_switch(self, to: str | None, from_: list[str] | None = None) -> SwitchRecord:
        """A switch starting now: to ``to`` (None: a model only leaves), from ``from_``."""
        return SwitchRecord(to=to, from_=list(from_ or []), started_at=time.time(),
                            started_mono=time.monotonic())

    # ------------------------------------------------------------------
    # Operations (each runs in a worker thread and reports back)

    def launch(self, m: ModelRuntime, kind: str, work: Callable[[OpContext], Any],
                done: Callable[[ModelRuntime, OpContext, Any, BaseException | None], None]
                ) -> OpContext:
        """Run ``work`` in a worker thread as ``m``'s one operation.

        ``done`` gets the result on the loop thread, unless the operation was
        detached meanwhile (``m.op`` replaced, e.g. by a stop): then it is ignored.
        """
        ctx = OpContext(op_id=next(self._op_ids), kind=kind)
        m.op = ctx

        def body() -> None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = work(ctx)
            except BaseException as exc:  # reported to the loop, which decides
                error = exc

            def report() -> None:
                if m.op is ctx:
                    m.op = None
                    done(m, ctx, result, error)
                else:
                    log.debug("op_result_ignored", model=m.name, op=kind)
            self.post(report)
            with self._workers_lock:
                self._workers.discard(threading.current_thread())

        t = threading.Thread(target=body, name=f"op-{kind}-{m.name}", daemon=True)
        with self._workers_lock:
            self._workers.add(t)
        t.start()
        return ctx

    def running_workers(self) -> list[threading.Thread]:
        """The operation threads still running (shutdown waits for them)."""
        with self._workers_lock:
            return list(self._workers)

    def _activate(self, m: ModelRuntime, reason: str) -> None:
        """Start or wake ``m``: first check that its memory is free (in a worker)."""
        if m.state not in (S.STOPPED, S.BACKOFF, S.SLEEPING):
            return
        if m.switch is None:
            m.switch = self.new_switch(m.name)
        probe = self.probe
        gpus = m.config.gpu_indices
        util = m.config.gpu_memory_utilization
        sleeper = m.child if m.state is S.SLEEPING else None
        self.launch(m, "preflight", lambda _ctx: memory_free_for(probe, gpus, util, sleeper),
                    self._preflight_done)

    def _preflight_done(self, m: ModelRuntime, _ctx: OpContext, result: Any,
                        error: BaseException | None) -> None:
        if self.shutdown is not None or m.removed:
            return
        ok, why = (True, "") if error is not None else result
        if error is not None:
            log.warning("gpu_check_failed", model=m.name, error=str(error))
        if not ok:
            if self._make_room(m, why):
                return
            self._start_failed(m, f"not enough free GPU memory for '{m.name}': {why}")
            return
        if m.state is S.SLEEPING:
            self._wake(m)
        elif m.state in (S.STOPPED, S.BACKOFF):
            self._start(m)

    def _make_room(self, m: ModelRuntime, why: str) -> bool:
        """Free memory on m's GPUs beyond what placement foresaw; True if waiting is useful.

        First wait for anything already moving, then put active models to sleep; only
        when nothing else is left, stop sleepers (their residue is what is in the way).
        """
        gpus = set(m.config.gpu_indices)
        others = [o for o in self.models.values()
                  if o is not m and gpus & set(o.config.gpu_indices)]
        if any(o.busy or o.state in (S.DRAINING, S.STOPPING, S.STARTING, S.WAKING)
               for o in others):
            return True
        actives = [o for o in others if o.state is S.ACTIVE and not o.pinned]
        for other in actives:
            log.info("making_room", model=m.name, evict=other.name, why=why)
            other.switch = m.switch
            if m.switch is not None:
                m.switch.from_.append(other.name)
            self.deactivate(other, other.config.sleep_level,
                             self.config.policy.drain_before_switch,
                             f"making room for {m.name}: {why}")
        if actives:
            return True
        sleepers = [o for o in others if o.state is S.SLEEPING]
        for other in sleepers:
            log.info("making_room", model=m.name, stop=other.name, why=why)
            self.stop_model(other, f"stopping a sleeper to make room for {m.name}: {why}")
        return bool(sleepers)

    def _start(self, m: ModelRuntime) -> None:
        cfg = self.config
        mc = m.config
        guardian = self.guardian
        log_dir = Path(cfg.daemon.log_dir)
        on_line = self._child_logger(mc.name) if cfg.vllm_logging else None
        m.backoff_until = 0.0
        m.enter(S.STARTING, "requests waiting" if not m.demands else "start requested")
        self.launch(m, "start", lambda ctx: start_child(ctx, cfg, mc, log_dir, on_line, guardian),
                    self._start_done)

    def _child_logger(self, model: str) -> Callable[[str], None]:
        child_log = structlog.get_logger("vllm")

        def on_line(line: str) -> None:
            child_log.info("child_output", model=model, line=line.rstrip("\n"))
        return on_line

    def _start_done(self, m: ModelRuntime, ctx: OpContext, result: Any,
                    error: BaseException | None) -> None:
        if error is not None:
            if self.shutdown is not None:
                if m.state is S.STARTING:
                    m.enter(S.STOPPED, "start cancelled by shutdown")
                return
            msg = str(error) if isinstance(error, OpFailed) else f"start failed: {error!r}"
            if not isinstance(error, OpFailed):
                log.error("start_crashed", model=m.name, exc_info=error)
            self._start_failed(m, msg)
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
        m.enter(S.ACTIVE, f"healthy (pid {child.pid})")
        self.became_active(m)

    def _start_failed(self, m: ModelRuntime, msg: str) -> None:
        m.last_error = msg
        err = ApiError("model_failed", msg, model=m.name)
        self.leases.refuse(m.name, err)
        settle(m.demands, err)
        m.demand_since = None
        self.finish_switch(m, "failed")
        if m.state is S.SLEEPING:       # no room to wake it: it stays asleep
            log.error("wake_refused", model=m.name, error=msg)
            return
        m.failures += 1
        log.error("start_failed", model=m.name, failures=m.failures, error=msg)
        limit = self.config.daemon.max_start_failures
        if m.failures >= limit:
            if m.state is not S.FAILED:
                m.enter(S.FAILED, f"{m.failures} failed starts in a row")
            self.leases.set_hold(m.name, self._failed_error(m))
        else:
            delay = self.config.daemon.restart_backoff_secs * 2 ** (m.failures - 1)
            m.backoff_until = time.monotonic() + delay
            if m.state is not S.BACKOFF:
                m.enter(S.BACKOFF, f"start failed; next try in {delay:g}s")
        self.apply_pending(m)

    def _wake(self, m: ModelRuntime) -> None:
        cfg = self.config
        level = m.sleep_level or m.config.sleep_level
        client = m.client
        name = m.name
        m.enter(S.WAKING, f"waking from level {level}")
        self.launch(m, "wake", lambda _ctx: wake_child(client, name, level, cfg),
                    self._wake_done)

    def _wake_done(self, m: ModelRuntime, ctx: OpContext, result: Any,
                   error: BaseException | None) -> None:
        if error is not None:
            msg = str(error)
            m.last_error = msg
            log.error("wake_failed", model=m.name, error=msg)
            err = ApiError("model_failed", msg + "; the model was stopped, the next "
                           "request starts it cold", model=m.name)
            self.leases.refuse(m.name, err)
            settle(m.demands, err)
            m.demand_since = None
            self.finish_switch(m, "failed")
            self.stop_model(m, "wake failed: stopping (L3)")
            return
        if m.switch is not None:
            for phase, secs in result.items():
                m.switch.add(phase, secs)
        m.enter(S.ACTIVE, "awake")
        self.became_active(m)

    def became_active(self, m: ModelRuntime) -> None:
        """m is ACTIVE: open its gate (grants its waiters), answer demands, end the switch."""
        self.leases.set_hold(m.name, None)
        granted = self.leases.open_gate(m.name)
        settle(m.demands, None, m)
        m.demand_since = None
        self.finish_switch(m, "ok")
        self.gpu_sampler.soon()
        log.info("model_active", model=m.name, granted=granted)
        self.apply_pending(m)

    def deactivate(self, m: ModelRuntime, level: int, drain: bool, reason: str) -> None:
        """ACTIVE → DRAINING: close the gate; the drain ends at 0 in flight or the timeout."""
        if m.state is not S.ACTIVE or m.busy:
            return
        in_flight = self.leases.close_gate(m.name)
        now = time.monotonic()
        m.drain_started = now
        m.drain_deadline = now + (self.config.daemon.drain_timeout_secs if drain else 0.0)
        m.drain_level = level
        m.enter(S.DRAINING, f"{reason} (level {level}, {in_flight} in flight)")
        self.kick()  # progress the drain on the next pass, not a TICK later (0 in flight)

    def _progress_drains(self, now: float) -> None:
        gates = self.leases.view()
        for m in list(self.models.values()):
            if m.state is not S.DRAINING or m.busy or m.drain_deadline is None:
                continue
            gate = gates.get(m.name)
            in_flight = gate.in_flight if gate else 0
            if in_flight and now < m.drain_deadline:
                continue
            drained = now - (m.drain_started or now)
            if in_flight and m.drain_deadline > (m.drain_started or 0.0):
                log.warning("drain_timeout", model=m.name, in_flight=in_flight,
                            waited_s=round(drained, 3))
                # Stop counting what the drain gave up on (issue 12): else the next
                # drain of this model waits the full timeout for the same leases.
                self.leases.revoke(m.name, f"drain timed out after {drained:.1f}s")
            elif in_flight:
                log.info("no_drain", model=m.name, in_flight=in_flight,
                         reason="drain_before_switch = false")
            if m.switch is not None:
                m.switch.add("drain", drained)
            m.drain_deadline = None
            if m.drain_level == 3 or self.shutdown is not None:
                self.stop_model(m, f"level 3 after drain ({in_flight} still in flight)")
            else:
                self._sleep(m, m.drain_level)

    def _sleep(self, m: ModelRuntime, level: int) -> None:
        cfg = self.config
        client, child, probe = m.client, m.child, self.probe
        timeout = cfg.daemon.sleep_timeout_secs
        residue = cfg.daemon.sleep_residue_mib
        gpus = m.config.gpu_indices
        self.launch(m, f"sleep{level}",
                    lambda _ctx: sleep_child(client, child, probe, gpus, level, timeout, residue),
                    lambda mm, ctx, res, err: self._sleep_done(mm, level, res, err))

    def _sleep_done(self, m: ModelRuntime, level: int, result: Any,
                    error: BaseException | None) -> None:
        if error is not None:
            msg = f"{error}; escalating to level 3 (stop)"
            m.last_error = msg
            log.warning("sleep_failed", model=m.name, sleep_level=level, error=str(error))
            self.stop_model(m, msg)
            return
        if m.switch is not None:
            for phase, secs in result.items():
                m.switch.add(phase, secs)
        m.enter(S.SLEEPING, f"asleep at level {level}")
        m.sleep_level = level
        self._left_gpu(m)

    def stop_model(self, m: ModelRuntime, reason: str, kill: bool = False) -> None:
        """Any state with a process → STOPPING → (worker: SIGTERM, grace, SIGKILL) → STOPPED."""
        child = m.child
        if m.op is not None:
            ctx = m.op
            ctx.cancelled = True
            child = child or ctx.child
            m.op = None             # its result will be ignored; the worker cleans up
        if m.state not in HAS_PROCESS:
            return
        if m.state is not S.STOPPING:
            m.enter(S.STOPPING, reason)
        self.leases.close_gate(m.name)
        revoked = self.leases.revoke(m.name, reason)
        if revoked:
            log.warning("leases_revoked", model=m.name, count=len(revoked), reason=reason)
        grace = 0.0 if kill else self.config.daemon.stop_timeout_secs
        self.launch(m, "stop", lambda _ctx: stop_child(child, grace, kill), self._stop_done)

    def _stop_done(self, m: ModelRuntime, ctx: OpContext, result: Any,
                   error: BaseException | None) -> None:
        secs, rc = result if error is None else (0.0, None)
        if error is not None:
            log.error("stop_failed", model=m.name, error=repr(error))
        if m.switch is not None:
            m.switch.add("sleep", secs)
        m.child = None
        m.client = None
        m.enter(S.STOPPED, f"process ended (exit code {rc})")
        self._left_gpu(m)

    def _left_gpu(self, m: ModelRuntime) -> None:
        """m no longer holds its GPUs: close a switch it was the only subject of."""
        settle(m.sleepers, None, m)
        self.gpu_sampler.soon()
        sw = m.switch
        m.switch = None
        if sw is not None and sw.to is None:
            sw.finish("ok")
            self._record_switch(sw)
            m.last_switch = sw
        elif sw is not None:
            m.last_switch = sw
        self.apply_pending(m)

    def finish_switch(self, m: ModelRuntime, result: str) -> None:
        """End m's switch: record it (log, metrics, last_switch) and learn its cost."""
        sw = m.switch
        m.switch = None
        if sw is None:
            return
        sw.finish(result)
        m.last_switch = sw
        for name in sw.from_:
            other = self.models.get(name)
            if other is not None:
                other.last_switch = sw
        self._record_switch(sw)
        if result == "ok" and sw.total_ms is not None:
            key = (sw.from_[0] if sw.from_ else None, m.name)
            secs = sw.total_ms / 1000
            old = self.costs.get(key)
            self.costs[key] = secs if old is None else COST_ALPHA * secs + (1 - COST_ALPHA) * old

    def _record_switch(self, sw: SwitchRecord) -> None:
        d = sw.to_dict()
        log.info("switch", from_model=d["from"], to_model=d["to"], result=d["result"],
                 total_ms=d["total_ms"], **{f"{k}_ms": v for k, v in d["phases_ms"].items()})
        self.metrics.switch(d["from"] or "", d["to"] or "", d["result"],
                            (d["total_ms"] or 0.0) / 1000, sw.phases_ms)

    def apply_pending(self, m: ModelRuntime) -> None:
        """After an operation: removed/changed by a reload? act now that it is idle."""
        if m.busy:
            return
        if m.removed:
            if m.state in HAS_PROCESS:
                self.stop_model(m, "removed by reload")
            else:
                self.models.pop(m.name, None)
                settle(m.sleepers, None, m)
                log.info("model_removed", model=m.name)
            return
        if m.pending_config is not None:
            if m.state in HAS_PROCESS:
                self.stop_model(m, "config changed by reload")
            else:
                m.config, m.pending_config = m.pending_config, None
                self.leases.add_model(m.name, m.config.upstream, m.name)
                log.info("model_config_applied", model=m.name)

    # ------------------------------------------------------------------
    # Reaping and sweeping

    def _reap(self) -> None:
        for m in list(self.models.values()):
            if m.busy or m.child is None:
                continue
            rc = m.child.poll()
            if rc is None:
                continue
            child = m.child
            m.child = None
            m.client = None
            tail = child.tail(TAIL_LINES)
            msg = f"'{m.name}' (pid {child.pid}) exited unexpectedly with code {rc}"
            m.last_error = msg + ("; last log lines:\n" + "\n".join(tail) if tail else "")
            if self.shutdown is None:
                log.error("child_died", model=m.name, pid=child.pid, code=rc)
            else:       # e.g. systemd's KillMode=control-group signalled it too
                log.info("child_exited_during_shutdown", model=m.name, pid=child.pid, code=rc)
            self.leases.close_gate(m.name)
            revoked = self.leases.revoke(m.name, msg)
            err = ApiError("model_failed", msg + "; the next request restarts it",
                           model=m.name)
            self.leases.refuse(m.name, err)
            settle(m.demands, err)
            m.demand_since = None
            m.drain_deadline = None
            if revoked:
                log.warning("leases_revoked", model=m.name, count=len(revoked), reason=msg)
            # Reap what is left of the group (engine workers) in a worker.
            threading.Thread(target=child.stop, args=(1.0,), daemon=True).start()
            if m.state is not S.STOPPING:
                m.enter(S.STOPPED, f"child exited with code {rc}")
            if m.switch is not None and m.switch.to == m.name:
                self.finish_switch(m, "failed")
            self._left_gpu(m)

    def _sweep_pids(self) -> None:
        for pid in self.leases.pids_with_leases():
            if not pid_alive(pid):
                self.reclaim_pid(pid)

    def reclaim_pid(self, pid: int) -> int:
        """Drop the leases of a dead client pid (any thread)."""
        gone = self.leases.reclaim_pid(pid)
        if gone:
            log.warning("leases_reclaimed", pid=pid, count=len(gone),
                        models=sorted({lease.model for lease in gone}))
        return len(gone)

    # ------------------------------------------------------------------
    # Reload and shutdown (lifecycle.py)

    def reload(self, new: Config) -> dict[str, list[str]]:
        """Apply a checked new config (loop thread): added, removed, changed models."""
        return lifecycle.reload(self, new)

    def begin_shutdown(self, reason: str) -> None:
        """Refuse new work and start draining; a second call skips the drain."""
        lifecycle.begin_shutdown(self, reason)

    # ------------------------------------------------------------------
    # Status and lookups for the control API (model_commands.py has the commands)

    def status_of(self, m: ModelRuntime) -> dict[str, Any]:
        """``ModelStatus`` of one model (see status.py)."""
        return model_status(m, self.leases.view().get(m.name))

    def status(self) -> dict[str, Any]:
        """The ``/v1/status`` document (see status.py)."""
        return daemon_status(self)

    def model_named(self, name: str) -> ModelRuntime:
        """The live model called ``name`` (not an alias), or model_not_found."""
        m = self.models.get(name)
        if m is None or m.removed:
            raise model_not_found(name)
        return m


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
