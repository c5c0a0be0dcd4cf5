"""The blocking halves of the switch operations: what a worker thread does to a child.

The switching layer (switching.py) decides (state changes, gates, switch records)
on the loop thread and hands each slow step to a worker (``OpRunner.launch``):
check free GPU memory, spawn a child and wait for ``/health`` (+ warm-up), wake it
(+ warm-up), sleep it and verify that its memory really dropped. These functions
are that work. They touch no model or lease state: they get what they need as
arguments, raise ``OpFailed`` with the message clients and logs see, and return
the phase timings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmuxd.config import Config, ModelConfig
from llmuxd.model import Operation

VERIFY_WINDOW = 3.0        # a sleeping child's memory may take a moment to drop
TAIL_LINES = 20
# A stop waits this long for the operation it cancelled (a start still spawning).
DETACHED_WAIT = 10.0


class OpFailed(Exception):
    """An operation on a child failed; the message is what clients and logs see."""


def memory_free_for(probe: Any, gpus: tuple[int, ...], util: float,
                    sleeper: Any = None) -> tuple[bool, str]:
    """Preflight: (fits, why). A sleeper waking counts its own residue as free."""
    from llmuxd.gpu.memory import child_usage, fits
    if sleeper is None:
        return fits(probe, gpus, util)
    return wake_fits(probe, gpus, util, child_usage(probe, sleeper.group_pids(), gpus))


def start_child(ctx: Operation, cfg: Config, mc: ModelConfig, log_dir: Path,
                on_line: Callable[[str], None] | None, guardian: Any
                ) -> tuple[Any, Any, dict[str, float]]:
    """Spawn ``vllm serve``, wait until healthy, warm up: (child, client, phases).

    The child is on ``ctx.child`` as soon as it exists, so a stop that cancels this
    start can find it; a cancelled or failed start stops its own child.
    """
    from llmuxd.child import ChildProcess
    from llmuxd.vllm_client import ChildExited, OpTimeout, VllmClient, VllmError

    timeout = cfg.startup_timeout(mc)
    grace = cfg.daemon.stop_timeout_secs
    warm = cfg.daemon.warmup
    warm_timeout = max(30.0, cfg.policy.request_timeout_secs)
    t0 = time.monotonic()
    try:
        child = ChildProcess.spawn(cfg, mc, log_dir, on_line=on_line, guardian=guardian)
    except OSError as exc:
        raise OpFailed(f"start failed: {exc}") from None
    ctx.child = child
    if ctx.cancelled:
        _end_child(child, grace, ctx.kill)
        raise OpFailed("start cancelled")
    client = VllmClient.for_model(mc)
    phases: dict[str, float] = {}
    foreign = ""
    try:
        client.wait_healthy(t0 + timeout, lambda: child.poll() is None and not ctx.cancelled)
        foreign = child.serves(mc)       # a foreign server on the port answers /health too
        if foreign:
            raise VllmError(foreign)
        phases["start"] = time.monotonic() - t0
        if warm:
            t1 = time.monotonic()
            client.warmup(timeout=warm_timeout)
            phases["warmup"] = time.monotonic() - t1
    except (VllmError, OSError) as exc:
        rc = child.poll()
        if ctx.cancelled:
            why = "start cancelled"
        elif foreign:
            why = foreign
        elif isinstance(exc, ChildExited) or rc is not None:
            why = f"the child exited with code {rc} during startup"
        elif isinstance(exc, OpTimeout) and "start" not in phases:
            why = f"not healthy within {timeout:g}s"
        else:
            why = str(exc)
        _end_child(child, grace, ctx.cancelled and ctx.kill)
        tail = child.tail(TAIL_LINES)
        msg = f"start of '{mc.name}' failed: {why}"
        if tail:
            msg += "; last log lines:\n" + "\n".join(tail)
        raise OpFailed(msg) from None
    return child, client, phases


def wake_child(client: Any, name: str, level: int, cfg: Config) -> dict[str, float]:
    """Wake a sleeping child from ``level`` and warm it up; the phase timings."""
    from llmuxd.vllm_client import VllmError
    warm = cfg.daemon.warmup
    warm_timeout = max(30.0, cfg.policy.request_timeout_secs)
    phases: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        client.wake(level, cfg.daemon.wake_timeout_secs)
        phases["wake"] = time.monotonic() - t0
        if warm:
            t1 = time.monotonic()
            client.warmup(timeout=warm_timeout)
            phases["warmup"] = time.monotonic() - t1
    except (VllmError, OSError) as exc:
        raise OpFailed(f"wake of '{name}' from level {level} failed: {exc}") from None
    return phases


def sleep_child(client: Any, child: Any, probe: Any, gpus: tuple[int, ...], level: int,
                timeout: float, residue: int) -> dict[str, float]:
    """Put a child to sleep, then verify its GPU memory dropped to ``residue`` MiB.

    vLLM can answer 200 to /sleep and free nothing (vllm#32714), so the probe has
    the last word, polled for up to ``VERIFY_WINDOW`` seconds.
    """
    from llmuxd.gpu.memory import child_usage, sleep_problem, sleep_verified
    from llmuxd.vllm_client import VllmError
    phases: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        client.sleep(level, timeout)
    except (VllmError, OSError) as exc:
        phases["sleep"] = time.monotonic() - t0
        raise OpFailed(f"sleep at level {level} failed: {exc}") from None
    phases["sleep"] = time.monotonic() - t0
    t1 = time.monotonic()
    deadline = t1 + VERIFY_WINDOW
    while True:
        usage = child_usage(probe, child.group_pids(), gpus)
        if usage is None or sleep_verified(usage, residue):
            break
        if time.monotonic() >= deadline:
            phases["verify"] = time.monotonic() - t1
            raise OpFailed(f"sleep at level {level} was ineffective: "
                           f"{sleep_problem(usage, residue)}")
        time.sleep(0.1)
    phases["verify"] = time.monotonic() - t1
    return phases


def stop_child(child: Any, grace: float, kill: bool,
               detached: Operation | None = None) -> tuple[float, int | None]:
    """SIGTERM, ``grace`` seconds, SIGKILL (or SIGKILL at once): (seconds, exit code).

    ``detached``: the operation this stop cancelled. A start may still be spawning
    its child (``detached.child`` not set yet): once the known child is down, wait
    for that worker (at most ``DETACHED_WAIT``) and end a child it started late, so
    that STOPPED always means no process of this model is left.
    """
    t0 = time.monotonic()
    rc = None
    if child is None and detached is not None:
        child = detached.child
    if child is not None:
        rc = _end_child(child, grace, kill)
    if detached is not None:
        detached.ended.wait(DETACHED_WAIT)
        late = detached.child
        if late is not None and late is not child:
            rc = _end_child(late, grace, kill)
    return time.monotonic() - t0, rc


def _end_child(child: Any, grace: float, kill: bool) -> int:
    """SIGKILL the group now (a kill) or SIGTERM, ``grace``, SIGKILL (a stop)."""
    rc: int = child.kill() if kill else child.stop(grace)
    return rc


def wake_fits(probe: Any, gpus: tuple[int, ...], util: float,
              own: dict[int, int] | None) -> tuple[bool, str]:
    """Like memory.fits, but a sleeper's own residue counts as free: it reuses it on wake."""
    from llmuxd.gpu.memory import fits, needed_mib
    if own is None:
        return fits(probe, gpus, util)
    infos = {g.index: g for g in probe.gpus()}
    for index in gpus:
        gpu = infos.get(index)
        if gpu is None:
            return fits(probe, gpus, util)
        need = needed_mib(gpu.total_mib, util)
        free = gpu.free_mib + own.get(index, 0)
        if free < need:
            return False, (f"GPU {index} has {free} MiB free (counting the sleeper's own "
                           f"{own.get(index, 0)} MiB), needs {need} MiB")
    return True, "fits"
