"""The daemon's reload and shutdown, run on the supervisor's loop thread.

Reload (SIGHUP or ``POST /v1/reload``) applies an already checked config: added
models appear, removed ones are refused, drained and stopped, changed ones take
aliases and sleep level in place and otherwise drain, stop and restart lazily with
the new table (a start in progress is cancelled), FAILED holds are cleared,
gunicorn gets SIGHUP. Refused during a shutdown.

Shutdown (SIGTERM/SIGINT) goes drain -> stopping -> done: leases and waiters are
refused at once, in-flight leases get ``drain_timeout_secs`` to finish (a second
signal cuts that short), then one stopper thread stops the front end and every
child in parallel; the loop exits when it is done, or with exit code 1 at the
hard deadline (drain + 2 x stop_timeout + 30 s).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import structlog

from llmuxd.config import Config
from llmuxd.core import Core, ShutdownState
from llmuxd.errors import ApiError, shutting_down
from llmuxd.frontend_keeper import FrontEndKeeper
from llmuxd.model import settle
from llmuxd.planner import Planner
from llmuxd.states import HAS_PROCESS, ModelState
from llmuxd.status import active_line
from llmuxd.switching import Switcher
from llmuxd.workers import OpRunner

log = structlog.get_logger("llmuxd.supervisor")
S = ModelState


def reload(core: Core, ops: Switcher, planner: Planner, fe: FrontEndKeeper,
           new: Config) -> dict[str, list[str]]:
    """Apply a checked new config (loop thread): added, removed, changed models.

    Refused while shutting down (the children are being stopped; a model added now
    would start after the drain). A model whose aliases or sleep level alone changed
    keeps its child; another change drains it and restarts it lazily.
    """
    if core.shutdown is not None:
        raise shutting_down()
    core.notifier.reloading()
    old = core.config
    added = sorted(n for n in new.models if n not in old.models)
    removed = sorted(n for n in old.models if n not in new.models)
    changed = sorted(n for n in new.models
                     if n in old.models and new.models[n] != old.models[n])
    core.config = new
    core.leases.max_queue = new.daemon.max_queue_per_model
    if new.policy.policy_type != old.policy.policy_type:
        planner.set_policy(new.policy.policy_type)
    for name in added:
        old_rt = core.models.get(name)
        if old_rt is not None and old_rt.removed:   # removed, then re-added
            old_rt.removed = False
            core.leases.set_hold(name, None)
            ops.reconfigure(old_rt, new.models[name])
        else:
            core.add_model(new.models[name])
    for name in removed:
        m = core.models[name]
        m.removed = True
        err = ApiError("model_not_found", f"model '{name}' was removed by a reload",
                       model=name)
        core.leases.set_hold(name, err)
        core.leases.refuse(name, err)
        settle(m.demands, err)
        m.demand_since = None
        ops.cancel_coming_in(m, "removed by reload")
        ops.apply_pending(m)
    for name in changed:
        ops.reconfigure(core.models[name], new.models[name])
    for m in core.models.values():
        if m.state is S.FAILED and not m.removed:
            m.failures = 0
            m.enter(S.STOPPED, "reload clears the failure hold")
            core.leases.set_hold(m.name, None)
    for key in ("socket", "socket_mode", "socket_group"):
        if getattr(old.daemon, key) != getattr(new.daemon, key):
            log.warning("reload_needs_restart", key=f"daemon.{key}")
    if old.metrics_port != new.metrics_port:
        log.warning("reload_needs_restart", key="metrics_port")
    fe.reload()
    result = {"added": added, "removed": removed, "changed": changed}
    log.info("reloaded", **result)
    core.notifier.ready(active_line(core.shutdown is not None, core.models))
    return result


def begin_shutdown(core: Core, reason: str) -> None:
    """Refuse new leases and commands, answer every waiter, start the bounded drain.

    A second signal while shutting down ends the drain at once.
    """
    now = time.monotonic()
    d = core.config.daemon
    if core.shutdown is not None:
        log.info("shutdown_hurry", reason=reason)
        core.shutdown.drain_deadline = now
        return
    core.shutdown = ShutdownState(
        reason=reason, drain_deadline=now + d.drain_timeout_secs,
        hard_deadline=now + d.drain_timeout_secs + 2 * d.stop_timeout_secs + 30)
    log.info("shutting_down", reason=reason, in_flight=core.leases.total_in_flight())
    core.notifier.stopping()
    refused = core.leases.shut()
    for m in core.models.values():
        settle(m.demands, shutting_down())
        settle(m.sleepers, shutting_down())
        if m.validate_job is not None and not m.validate_job.reply.done():
            m.validate_job.reply.set_exception(shutting_down())
        m.demand_since = None
    if refused:
        log.info("waiters_refused", count=refused)


def progress_shutdown(core: Core, fe: FrontEndKeeper, runner: OpRunner, now: float) -> bool:
    """Each loop pass: end the drain (0 in flight or its deadline), then await the stopper.

    True once the shutdown is done (the loop ends; ``exit_code`` says how).
    """
    sd = core.shutdown
    assert sd is not None
    if sd.stage == "drain":
        in_flight = core.leases.total_in_flight()
        if in_flight and now < sd.drain_deadline:
            return False
        if in_flight:
            log.warning("shutdown_drain_timeout", in_flight=in_flight)
        sd.stage = "stopping"
        _stop_everything(core, sd, fe, runner)
    elif sd.stage == "stopping":
        stopper = sd.stopper
        if stopper is not None and stopper.is_alive() and now < sd.hard_deadline:
            return False
        if stopper is not None and stopper.is_alive():
            log.error("shutdown_hard_deadline")
            sd.exit_code = 1
        sd.stage = "done"
    return sd.stage == "done"


def _stop_everything(core: Core, sd: ShutdownState, fe_keeper: FrontEndKeeper,
                     runner: OpRunner) -> None:
    """Hand every child and the front end to one stopper thread that stops them in parallel."""
    children = []
    for m in core.models.values():
        child = m.child
        if m.op is not None:
            m.op.detach()
            child = child or m.op.child
            m.op = None
        if child is not None:
            children.append((m.name, child))
        m.child = None          # the stopper owns it now; the reaper must not report it
        if m.state in HAS_PROCESS and m.state is not S.STOPPING:
            m.enter(S.STOPPING, "daemon shutting down")
    fe = fe_keeper.handle
    grace = core.config.daemon.stop_timeout_secs

    def work() -> None:
        threads = []
        if fe is not None:
            t = threading.Thread(target=lambda: fe.stop(grace), daemon=True)
            t.start()
            threads.append(t)
        for _name, child in children:
            t = threading.Thread(target=child.stop, args=(grace,), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(timeout=grace + 15)
        # Ops cancelled mid-flight clean up their own children; wait for them.
        workers = runner.running()
        for w in workers:
            w.join(timeout=grace + 15)

    sd.stopper = threading.Thread(target=work, name="shutdown", daemon=True)
    sd.stopper.start()


def finish(core: Core, server: Any, exit_code: int) -> None:
    """After the loop: mark what was stopping as stopped, close the socket and the guardian."""
    for m in core.models.values():
        if m.state is S.STOPPING:
            m.child = None
            m.enter(S.STOPPED, "daemon stopped")
    if server is not None:
        server.close()
    if core.guardian is not None:
        with contextlib.suppress(Exception):
            core.guardian.close()
    log.info("stopped", exit_code=exit_code)
