"""The daemon's reload and shutdown, run on the supervisor's loop thread.

Reload (SIGHUP or ``POST /v1/reload``) applies an already checked config: added
models appear, removed ones are refused and stopped, changed ones stop and restart
lazily with the new table, FAILED holds are cleared, gunicorn gets SIGHUP.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from llmuxd.config import Config
from llmuxd.control.errors import ApiError, shutting_down
from llmuxd.model import settle
from llmuxd.policy import make_policy
from llmuxd.states import HAS_PROCESS, ModelState
from llmuxd.status import active_line

if TYPE_CHECKING:
    from llmuxd.supervisor import Supervisor

log = structlog.get_logger("llmuxd.supervisor")
S = ModelState


@dataclass
class ShutdownState:
    """A shutdown in progress: why, its deadlines, and the thread stopping the children."""

    reason: str
    drain_deadline: float
    hard_deadline: float
    stage: str = "drain"      # drain -> stopping -> done
    stopper: threading.Thread | None = None


def reload(sup: Supervisor, new: Config) -> dict[str, list[str]]:
    """Apply a checked new config (loop thread): added, removed, changed models."""
    sup.notifier.reloading()
    old = sup.config
    added = sorted(n for n in new.models if n not in old.models)
    removed = sorted(n for n in old.models if n not in new.models)
    changed = sorted(n for n in new.models
                     if n in old.models and new.models[n] != old.models[n])
    sup.config = new
    sup.leases.max_queue = new.daemon.max_queue_per_model
    if new.policy.policy_type != old.policy.policy_type:
        sup.policy = make_policy(new.policy.policy_type)
    for name in added:
        old_rt = sup.models.get(name)
        if old_rt is not None and old_rt.removed:   # removed, then re-added
            old_rt.removed = False
            old_rt.pending_config = new.models[name]
            sup.leases.set_hold(name, None)
        else:
            sup.add_model(new.models[name])
    for name in removed:
        m = sup.models[name]
        m.removed = True
        err = ApiError("model_not_found", f"model '{name}' was removed by a reload",
                       model=name)
        sup.leases.set_hold(name, err)
        sup.leases.refuse(name, err)
        settle(m.demands, err)
        m.demand_since = None
        sup.apply_pending(m)
    for name in changed:
        m = sup.models[name]
        m.pending_config = new.models[name]
        sup.apply_pending(m)
    for m in sup.models.values():
        if m.state is S.FAILED and not m.removed:
            m.failures = 0
            m.enter(S.STOPPED, "reload clears the failure hold")
            sup.leases.set_hold(m.name, None)
    for key in ("socket", "socket_mode", "socket_group"):
        if getattr(old.daemon, key) != getattr(new.daemon, key):
            log.warning("reload_needs_restart", key=f"daemon.{key}")
    if old.metrics_port != new.metrics_port:
        log.warning("reload_needs_restart", key="metrics_port")
    sup.fe.reload()
    result = {"added": added, "removed": removed, "changed": changed}
    log.info("reloaded", **result)
    sup.notifier.ready(active_line(sup))
    return result

def begin_shutdown(sup: Supervisor, reason: str) -> None:
    """Refuse new leases and commands, answer every waiter, start the bounded drain.

    A second signal while shutting down ends the drain at once.
    """
    now = time.monotonic()
    d = sup.config.daemon
    if sup.shutdown is not None:
        log.info("shutdown_hurry", reason=reason)
        sup.shutdown.drain_deadline = now
        return
    sup.shutdown = ShutdownState(
        reason=reason, drain_deadline=now + d.drain_timeout_secs,
        hard_deadline=now + d.drain_timeout_secs + 2 * d.stop_timeout_secs + 30)
    log.info("shutting_down", reason=reason, in_flight=sup.leases.total_in_flight())
    sup.notifier.stopping()
    refused = sup.leases.shut()
    for m in sup.models.values():
        settle(m.demands, shutting_down())
        settle(m.sleepers, shutting_down())
        if m.validate_job is not None and not m.validate_job.reply.done():
            m.validate_job.reply.set_exception(shutting_down())
        m.demand_since = None
    if refused:
        log.info("waiters_refused", count=refused)

def progress_shutdown(sup: Supervisor, now: float) -> None:
    """Each loop pass: end the drain (0 in flight or its deadline), then await the stopper."""
    sd = sup.shutdown
    assert sd is not None
    if sd.stage == "drain":
        in_flight = sup.leases.total_in_flight()
        if in_flight and now < sd.drain_deadline:
            return
        if in_flight:
            log.warning("shutdown_drain_timeout", in_flight=in_flight)
        sd.stage = "stopping"
        _stop_everything(sup, sd)
    elif sd.stage == "stopping":
        stopper = sd.stopper
        if stopper is not None and stopper.is_alive() and now < sd.hard_deadline:
            return
        if stopper is not None and stopper.is_alive():
            log.error("shutdown_hard_deadline")
            sup.exit_code = 1
        sd.stage = "done"
        sup.done = True

def _stop_everything(sup: Supervisor, sd: ShutdownState) -> None:
    """Hand every child and the front end to one stopper thread that stops them in parallel."""
    children = []
    for m in sup.models.values():
        child = m.child
        if m.op is not None:
            m.op.cancelled = True
            child = child or m.op.child
            m.op = None
        if child is not None:
            children.append((m.name, child))
        m.child = None          # the stopper owns it now; the reaper must not report it
        if m.state in HAS_PROCESS and m.state is not S.STOPPING:
            m.enter(S.STOPPING, "daemon shutting down")
    fe = sup.fe.handle
    grace = sup.config.daemon.stop_timeout_secs

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
        workers = sup.running_workers()
        for w in workers:
            w.join(timeout=grace + 15)

    sd.stopper = threading.Thread(target=work, name="shutdown", daemon=True)
    sd.stopper.start()

def finish(sup: Supervisor) -> None:
    """After the loop: mark what was stopping as stopped, close the socket and the guardian."""
    for m in sup.models.values():
        if m.state is S.STOPPING:
            m.child = None
            m.enter(S.STOPPED, "daemon stopped")
    if sup.server is not None:
        sup.server.close()
    if sup.guardian is not None:
        with contextlib.suppress(Exception):
            sup.guardian.close()
    log.info("stopped", exit_code=sup.exit_code)
