"""start / wake / switch, sleep and kill as the control API asks, on the loop thread.

The control threads (control/commands.py) parse and check a request, then the
command port (daemon_port.py) runs one of these through the mailbox's ``call``
and waits for the future, at most
``wait_timeout``. These only record what is wanted (a demand, a sleeper) or begin
the operation; the loop does the rest and answers the future when the model got
there (``wait``), or at once.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

from llmuxd.config import Config
from llmuxd.core import Core
from llmuxd.errors import ApiError, shutting_down
from llmuxd.model import settle
from llmuxd.states import HAS_PROCESS, ModelState
from llmuxd.switching import Switcher

S = ModelState


def activate(core: Core, name: str, fut: Future[Any], wait: bool) -> None:
    """start / wake / switch: make ``name`` ACTIVE (others leave as placement needs)."""
    if core.shutdown is not None:
        raise shutting_down()
    m = core.model_named(name)
    if m.state is S.FAILED:
        m.failures = 0
        m.enter(S.STOPPED, "start requested: clearing the failure hold")
        core.leases.set_hold(m.name, None)
    elif m.state is S.BACKOFF:
        m.failures = 0
        m.backoff_until = 0.0
    if m.state is S.ACTIVE:
        fut.set_result(m)
        return
    m.demands.append(fut if wait else Future())
    if m.demand_since is None:
        m.demand_since = time.monotonic()
    if not wait:
        fut.set_result(m)
    core.kick()


def sleep(core: Core, ops: Switcher, name: str, level: int, fut: Future[Any],
          wait: bool) -> None:
    """Put ``name`` to sleep at ``level`` (3: stop it); with ``wait``, answer once it left."""
    if core.shutdown is not None:
        raise shutting_down()
    m = core.model_named(name)
    if m.config.keep_active and m.state in HAS_PROCESS:
        raise ApiError("conflict", f"model '{name}' has keep_active = true: llmuxd keeps "
                       "it active (remove keep_active and reload to let it sleep)",
                       model=name, state=str(m.state))
    if m.state in (S.STOPPED, S.BACKOFF, S.FAILED) or (
            m.state is S.SLEEPING and level != 3):
        fut.set_result(m)
        return
    if m.state is S.SLEEPING and level == 3 and not m.busy:
        m.switch = ops.new_switch(None, [m.name])
        ops.stop_model(m, "sleep level 3 requested")
    elif m.state is S.ACTIVE and not m.busy:
        m.switch = ops.new_switch(None, [m.name])
        ops.deactivate(m, level, True, "sleep requested")
    else:
        raise ApiError("conflict", f"model '{name}' is {m.state} "
                       f"({m.op.kind if m.op else 'busy'}); try again when it settles",
                       model=name, state=str(m.state))
    m.sleepers.append(fut if wait else Future())
    if not wait:
        fut.set_result(m)


def kill(core: Core, ops: Switcher, name: str, fut: Future[Any], wait: bool) -> None:
    """SIGKILL ``name``'s process group now; its leases are revoked, its waiters refused.

    A model with no process yet but a preflight running (the first step of a start)
    has that start cancelled too: a kill never lets a start go on.
    """
    m = core.model_named(name)
    if m.state not in HAS_PROCESS and not m.busy:
        fut.set_result(m)
        return
    err = ApiError("model_failed", f"model '{name}' was killed by an operator",
                   model=name)
    core.leases.refuse(name, err)
    settle(m.demands, err)
    m.demand_since = None
    if m.switch is not None and m.switch.to == m.name:
        ops.finish_switch(m, "failed")
    ops.stop_model(m, "kill requested", kill=True)
    if m.state not in HAS_PROCESS:         # only a preflight was cancelled: done
        fut.set_result(m)
        return
    m.sleepers.append(fut if wait else Future())
    if not wait:
        fut.set_result(m)


def wait_timeout(config: Config, name: str, op: str) -> float:
    """How long a control call may wait for ``op`` on ``name`` (generous, bounded)."""
    d = config.daemon
    mc = config.resolve_model(name)
    startup = config.startup_timeout(mc) if mc else d.startup_timeout_secs
    base = d.drain_timeout_secs + d.sleep_timeout_secs + d.stop_timeout_secs + 30
    if op in ("start", "wake", "switch", "validate"):
        return base + startup + d.wake_timeout_secs
    return base


def validate_timeout(config: Config, name: str, levels: int) -> float:
    """A validate job's deadline in seconds, from its request to its answer.

    ``daemon.validate_timeout_secs`` when set; else (0) what its steps may take at
    most: ``wait_timeout`` for getting the model active and alone on its GPUs, and
    again for each level run. Past it the job ends with ``timeout`` and unpins.
    """
    if config.daemon.validate_timeout_secs > 0:
        return config.daemon.validate_timeout_secs
    return wait_timeout(config, name, "validate") * (1 + levels)
