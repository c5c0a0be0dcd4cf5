"""The supervisor: the top of the daemon, one loop thread that wires the layers together.

Why one thread (the gunicorn-arbiter lesson): signal handlers, control-API
threads and worker threads never change model state themselves. They put a
callable on the mailbox (core.py) and, when they need an answer, wait on a
Future with a timeout. The loop runs those callables, reaps children, progresses
drains, asks the planner to schedule and keeps the front end alive. Everything
that blocks runs in a worker thread (workers.py) and reports back with another
callable, so the loop itself never waits on a child.

The one exception is the lease table (see leases.py): a lock-protected fast
path, so a request for an ACTIVE model never waits for this loop.

This module only wires and loops; the layers below do the work and know nothing
of it (docs/daemon.md, "Layers"): ``Core`` (state), ``Switcher`` (operations on
the model table), ``Planner`` (policy → operations), lifecycle.py (reload,
shutdown), ``ValidateJobs``, ``FrontEndKeeper``, status.py, and ``DaemonPort``,
the control API's only way in. Only the entry point (cli.py) imports this module.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from typing import Any

import structlog

from llmuxd import __version__ as VERSION
from llmuxd import lifecycle
from llmuxd.config import Config, load_config, policy_warnings
from llmuxd.core import Core, Mailbox
from llmuxd.daemon_port import DaemonPort
from llmuxd.errors import ApiError
from llmuxd.frontend_keeper import FrontEndKeeper
from llmuxd.host_memory import HostMemoryKeeper
from llmuxd.metrics import Metrics
from llmuxd.model import ModelRuntime
from llmuxd.pidcheck import pid_alive
from llmuxd.planner import Planner, policy_options
from llmuxd.sdnotify import SdNotify
from llmuxd.status import (
    DaemonFacts,
    GpuSampler,
    active_line,
    daemon_status,
    scheduler_facts,
    update_gauges,
)
from llmuxd.switching import Switcher
from llmuxd.upkeep import Upkeep
from llmuxd.validate_jobs import ValidateJobs
from llmuxd.watchdog_keeper import WatchdogKeeper
from llmuxd.workers import OpRunner

__all__ = ["Supervisor", "pid_alive"]

log = structlog.get_logger("llmuxd.supervisor")

TICK = 0.2                 # reap / drain / schedule at least this often
PID_SWEEP = 1.0            # check lease-holding client pids this often


class Supervisor:
    """Builds the layers, runs the loop, handles signals; the only owner of the thread."""

    def __init__(self, config: Config, config_path: str, *, frontend: bool = True,
                 probe: Any = None, notifier: SdNotify | None = None,
                 metrics: Metrics | None = None) -> None:
        self.mailbox = Mailbox()
        self.core = core = Core(config, config_path, self.mailbox, probe=probe,
                                notifier=notifier, metrics=metrics)
        self.gpu_sampler = GpuSampler(self.mailbox.post, core.metrics)
        self.runner = OpRunner(self.mailbox.post, self._op_ended)
        self.ops = Switcher(core, self.runner, self.gpu_sampler.soon)
        self.planner = Planner(core, self.ops)
        self.upkeep = Upkeep(core, self.ops)
        self.memory = HostMemoryKeeper(core, self.ops)
        self.ops.no_room = self._no_room
        self.ops.choose_level = self.memory.choose_level
        self.ops.slept = self.memory.slept
        self.validations = ValidateJobs(core, self.ops)
        self.fe = FrontEndKeeper(core, frontend, self.mark_ready)
        self.watchdog = WatchdogKeeper(core, self.ops)
        self.port = DaemonPort(core, self.ops, self.validations, self.status, self.reload,
                               lambda: self.planner.explained)
        self.server: Any = None
        self.done = False
        self.exit_code = 0
        self._next_sweep = 0.0
        self._next_watchdog = 0.0
        self._watchdog_every = core.notifier.watchdog_interval()
        self._status_line = ""
        self.loop_thread: threading.Thread | None = None

    def _no_room(self, m: ModelRuntime, why: str) -> bool:
        """A preflight found too little memory: a prewarm gives up, else make room."""
        handled = self.upkeep.no_room(m, why)
        return self.planner.make_room(m, why) if handled is None else handled

    def _op_ended(self, m: ModelRuntime) -> None:
        """An operation of m ended and m is idle: the one place a pending config applies."""
        self.ops.apply_pending(m)

    # ------------------------------------------------------------------
    # The loop

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: self.mailbox.signal(s))

    def run(self) -> int:
        """Run until shut down; returns the exit code."""
        self.loop_thread = threading.current_thread()
        try:
            self._boot()
        except BaseException:
            self.watchdog.stop()
            if self.server is not None:
                self.server.close()
            if self.core.guardian is not None:
                with contextlib.suppress(Exception):
                    self.core.guardian.close()
            raise
        events = self.mailbox.events
        while not self.done:
            try:
                ev = events.get(timeout=self._next_wait())
            except queue.Empty:
                ev = None
            while True:
                self._handle(ev)
                try:
                    ev = events.get_nowait()
                except queue.Empty:
                    break
            try:
                self._tick()
            except Exception:
                log.exception("tick_failed")
        self.mailbox.closed = True
        self.watchdog.stop()
        lifecycle.finish(self.core, self.server, self.exit_code)
        return self.exit_code

    def _next_wait(self) -> float:
        """Until the next pass: TICK, or sooner when the policy asked to be asked again
        then (a deferral, a quantum's end) — not up to a TICK late."""
        at = self.planner.recheck_at
        left = None if at is None else at - time.monotonic()
        if left is None or left <= 0:       # none, or already due: the regular pass
            return TICK
        return min(TICK, max(0.005, left))

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
            if self.core.shutdown is not None:
                log.warning("reload_refused", signal="SIGHUP", reason="shutting down")
                return
            log.info("signal", signal="SIGHUP", action="reload")
            try:
                new = load_config(self.core.config_path)
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

        core = self.core
        if core.probe is None:
            from llmuxd.gpu.select import make_probe_explained
            core.probe, why = make_probe_explained(core.config)
            log.info("gpu_probe", probe=core.probe.name, why=why)
        self.server = ControlServer(self.port, core.config.daemon)
        self.server.start()
        core.guardian = Guardian.start_new(grace=core.config.daemon.stop_timeout_secs)
        core.metrics.serve(core.config.metrics_port, core.probe, core.config.metrics_host,
                           core.config.daemon.read_timeout_secs)
        self.watchdog.configure()
        for warning in policy_warnings(core.config):
            log.warning("config_warning", warning=warning)
        log.info("listening", socket=core.config.daemon.socket, pid=os.getpid(),
                 version=VERSION, models=sorted(core.models),
                 metrics_port=core.config.metrics_port)
        if self.fe.want:
            self.fe.start()
        else:
            self.mark_ready()

    def mark_ready(self) -> None:
        core = self.core
        if not core.ready:
            core.ready = True
            core.notifier.ready(self._active_line())
            log.info("ready")

    def _active_line(self) -> str:
        return active_line(self.core.shutdown is not None, self.core.models)

    def _tick(self) -> None:
        core = self.core
        now = time.monotonic()
        self.ops.reap()
        self.ops.progress_drains(now)
        self.watchdog.publish()
        if core.shutdown is not None:
            if lifecycle.progress_shutdown(core, self.fe, self.runner, now):
                self.exit_code = core.shutdown.exit_code
                self.done = True
        else:
            self.ops.refuse_failed()
            self.validations.progress(now)
            self.planner.schedule(now)
            self.upkeep.progress(now)
            self.fe.check(now)
        if now >= self._next_sweep:
            self._next_sweep = now + PID_SWEEP
            self._sweep_pids()
            for gone in core.leases.expire(core.config.daemon.max_lease_secs):
                log.warning("lease_expired", model=gone.model, lease=gone.lease_id,
                            pid=gone.pid)
            update_gauges(core.models, core.leases.view(), core.metrics,
                          self.planner.explained, self.planner.policy.name, core.costs)
        self.gpu_sampler.maybe_sample(core.probe, core.models, now)
        self.memory.maybe_sample(now)
        if self._watchdog_every and now >= self._next_watchdog:
            self._next_watchdog = now + self._watchdog_every
            core.notifier.watchdog()
        status = self._active_line()
        if status != self._status_line and (core.notifier.status(status)
                                            or not core.notifier.enabled):
            self._status_line = status      # a message that found no room is sent again

    def _sweep_pids(self) -> None:
        for pid in self.core.leases.pids_with_leases():
            if not pid_alive(pid):
                self.port.reclaim_pid(pid)

    # ------------------------------------------------------------------
    # Reload, shutdown, status (loop thread)

    def reload(self, new: Config) -> dict[str, list[str]]:
        """Apply a checked new config (loop thread): added, removed, changed models."""
        for warning in policy_warnings(new):
            log.warning("config_warning", warning=warning)
        result = lifecycle.reload(self.core, self.ops, self.planner, self.fe, new)
        self.watchdog.configure()
        return result

    def begin_shutdown(self, reason: str) -> None:
        """Refuse new work and start draining; a second call skips the drain."""
        lifecycle.begin_shutdown(self.core, reason)

    def status(self) -> dict[str, Any]:
        """The ``/v1/status`` document (see status.py)."""
        core = self.core
        facts = DaemonFacts(
            started_at=core.started_at, config_path=core.config_path,
            socket=core.config.daemon.socket, ready=core.ready,
            shutting_down=core.shutdown is not None, policy=self.planner.policy.name,
            frontend_pid=self.fe.pid, probe=getattr(core.probe, "name", None),
            scheduler=scheduler_facts(self.planner.policy.name,
                                      vars(policy_options(core.config.policy)), core.costs))
        doc = daemon_status(facts, core.models, core.leases.view(), self.gpu_sampler.gpus,
                            self.planner.explained)
        doc["upkeep"] = self.upkeep.status()
        doc["memory"] = self.memory.status()
        return doc
