"""One function per llmuxctl command: ask llmuxd, then print for people or for scripts.

Each command takes the ``Context`` and returns the exit code; failures are raised as
CtlError and turned into one line (and an exit code) by ``cli.main``. With ``--json``
a command prints the daemon's data as it came, so scripts and people see the same facts.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import quote

from llmuxctl import __version__
from llmuxctl.client import ControlClient, model_path
from llmuxctl.errors import EXIT_FAILED, EXIT_OK, CtlError, OperationFailed
from llmuxctl.locate import Target
from llmuxctl.progress import LongOperation
from llmuxctl.table import gpu_lines, scheduling_lines, state_phrase, status_table
from llmuxctl.upkeep_lines import upkeep_lines

DEFAULT_OP_TIMEOUT = 3600.0   # llmuxd bounds each operation itself; this guards a hung one
FOLLOW_WINDOW = 1000          # lines fetched per poll of `logs -f`
FOLLOW_POLL_SECS = 1.0


@dataclass
class Context:
    """What every command needs: its arguments, the socket, and where to print."""

    args: argparse.Namespace
    target: Target
    client: ControlClient
    out: TextIO
    err: TextIO

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    def emit_json(self, data: Any) -> None:
        self.out.write(json.dumps(data, indent=2) + "\n")
        self.out.flush()

    def say(self, line: str = "") -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def wait(self, op: LongOperation) -> Any:
        """Run a long operation: a progress line on a TTY, silence otherwise."""
        if self.err.isatty() and not self.json:
            return op.run_with_progress(self.err)
        return op.run_quietly()


# ---------------------------------------------------------------------------
# status


def cmd_status(ctx: Context) -> int:
    """The table of every model (or those named), like ``supervisorctl status``."""
    names: list[str] = ctx.args.models
    status = ctx.client.get("/v1/status")
    models: dict[str, Any] = dict(status.get("models") or {})
    failures: list[CtlError] = []
    if names:
        chosen: dict[str, Any] = {}
        for name in names:
            if name in models:
                chosen[name] = models[name]
                continue
            try:  # an alias, or a model added since: the daemon resolves it
                one = ctx.client.get(model_path(name))
            except OperationFailed as exc:
                failures.append(exc)
                continue
            chosen[str(one.get("name", name))] = one
        models = chosen
        status = {**status, "models": models}
    if ctx.json:
        ctx.emit_json(status)
    else:
        for line in status_table(list(models.values())):
            ctx.say(line)
        for line in scheduling_lines(status if not names else {"models": models}):
            ctx.say(line)
        if not names:
            for line in upkeep_lines(status):
                ctx.say(line)
            for line in gpu_lines(status.get("gpus")):
                ctx.say(line)
    for failure in failures:
        ctx.err.write(failure.line() + "\n")
    return EXIT_FAILED if failures else EXIT_OK


# ---------------------------------------------------------------------------
# start, sleep, wake, kill, switch


def _long_op(ctx: Context, action: str, doing: str, done: str,
             body: Any = None) -> int:
    model: str = ctx.args.model
    no_wait = bool(getattr(ctx.args, "no_wait", False))
    params = {"wait": "0" if no_wait else "1"}
    started = time.monotonic()
    if no_wait:
        status = ctx.client.post(model_path(model, action), body, params)
    else:
        op = LongOperation(ctx.client, path=model_path(model, action), body=body,
                           params=params, timeout=ctx.args.timeout,
                           doing=doing.format(model=model), model=model)
        status = ctx.wait(op)
    if ctx.json:
        ctx.emit_json(status)
        return EXIT_OK
    name = status.get("name", model) if isinstance(status, dict) else model
    phrase = state_phrase(status) if isinstance(status, dict) else "done"
    if no_wait:
        ctx.say(f"{name}: {action} requested, now {phrase}")
    else:
        ctx.say(f"{name}: {done}, {phrase} ({time.monotonic() - started:.1f}s)")
        switch = status.get("last_switch") if isinstance(status, dict) else None
        if action == "switch" and isinstance(switch, dict) and switch.get("phases_ms"):
            phases = ", ".join(f"{k} {v:.0f}ms" for k, v in switch["phases_ms"].items()
                               if isinstance(v, int | float))
            ctx.say(f"{name}: switch {switch.get('from') or ''}->{switch.get('to') or name}: "
                    f"{switch.get('result', '?')}; {phases}")
    return EXIT_OK


def cmd_start(ctx: Context) -> int:
    return _long_op(ctx, "start", "starting {model}", "started")


def cmd_sleep(ctx: Context) -> int:
    level = ctx.args.level
    if level is None:  # the model's configured level; asking also checks the name
        level = ctx.client.get(model_path(ctx.args.model)).get("configured_sleep_level")
    body = {"level": level} if level is not None else {}
    return _long_op(ctx, "sleep", "putting {model} to sleep" + (f" (L{level})" if level else ""),
                    "slept", body)


def cmd_wake(ctx: Context) -> int:
    return _long_op(ctx, "wake", "waking {model}", "woke")


def cmd_kill(ctx: Context) -> int:
    return _long_op(ctx, "kill", "killing {model}", "killed")


def cmd_switch(ctx: Context) -> int:
    return _long_op(ctx, "switch", "switching to {model}", "switched")


# ---------------------------------------------------------------------------
# logs


def new_lines(previous: list[str], current: list[str]) -> list[str]:
    """The lines of ``current`` that come after ``previous`` (two tails of one growing file).

    Both are the last W lines of the file at two moments; the longest tail of
    ``previous`` that opens ``current`` is the part already shown. No overlap means the
    file was rotated or grew by more than W lines: everything in ``current`` is new.
    """
    for k in range(min(len(previous), len(current)), 0, -1):
        if previous[-k:] == current[:k]:
            return current[k:]
    return current


def _fetch_logs(ctx: Context, lines: int) -> dict[str, Any]:
    data = ctx.client.get(model_path(ctx.args.model, "logs"), {"lines": str(lines)})
    if not isinstance(data, dict) or not isinstance(data.get("lines"), list):
        raise OperationFailed("llmuxd answered the logs request without lines",
                              code="bad_answer")
    data["lines"] = [str(line).rstrip("\n") for line in data["lines"]]
    return data


def _print_lines(ctx: Context, model: str, lines: list[str]) -> None:
    for line in lines:
        if ctx.json and ctx.args.follow:
            ctx.out.write(json.dumps({"model": model, "line": line}) + "\n")
        else:
            ctx.out.write(line + "\n")
    ctx.out.flush()


def cmd_logs(ctx: Context) -> int:
    """The tail of a model's log; ``-f`` polls for more until Ctrl-C or a closed pipe."""
    count: int = ctx.args.lines
    if not ctx.args.follow:
        data = _fetch_logs(ctx, max(count, 1))  # llmuxd serves 1..10000 lines
        data["lines"] = data["lines"][-count:] if count else []
        if ctx.json:
            ctx.emit_json(data)
        else:
            _print_lines(ctx, ctx.args.model, data["lines"])
        return EXIT_OK
    window = max(count, FOLLOW_WINDOW)
    data = _fetch_logs(ctx, window)
    model = str(data.get("model", ctx.args.model))
    seen: list[str] = data["lines"]
    try:
        # Ctrl-C once lines are coming out ends the follow normally, also while the
        # first ones are still being printed.
        _print_lines(ctx, model, seen[-count:] if count else [])
        while True:
            time.sleep(FOLLOW_POLL_SECS)  # the poll interval, not a synchronisation
            current = _fetch_logs(ctx, window)["lines"]
            _print_lines(ctx, model, new_lines(seen, current))
            seen = current
    except KeyboardInterrupt:
        return EXIT_OK


# ---------------------------------------------------------------------------
# reload, validate, version, and the completion helper


def cmd_reload(ctx: Context) -> int:
    """Re-read the config in llmuxd; prints what changed, like ``supervisorctl update``."""
    result = ctx.client.post("/v1/reload", timeout=ctx.args.timeout)
    if ctx.json:
        ctx.emit_json(result)
        return EXIT_OK
    changed = False
    for key in ("added", "removed", "changed"):
        for name in result.get(key) or []:
            ctx.say(f"{name}: {key}")
            changed = True
    if not changed:
        ctx.say("no changes")
    return EXIT_OK


def cmd_validate(ctx: Context) -> int:
    """Sleep/wake cycles checked through the daemon; exit 0 only when every level passed."""
    from llmuxctl.report import render_validate, validate_passed

    model: str = ctx.args.model
    levels: list[int] = ctx.args.levels
    op = LongOperation(ctx.client, path="/v1/validate/" + quote(model, safe=""),
                       body={"levels": levels, "verbose": bool(ctx.args.verbose)},
                       timeout=ctx.args.timeout,
                       doing=f"validating {model} at " + ",".join(f"L{lv}" for lv in levels),
                       model=model)
    report = ctx.wait(op)
    if ctx.json:
        ctx.emit_json(report)
    else:
        for line in render_validate(report, verbose=bool(ctx.args.verbose)):
            ctx.say(line)
    return EXIT_OK if validate_passed(report) else EXIT_FAILED


def cmd_version(ctx: Context) -> int:
    """This client's version and the running daemon's (unreachable → exit 3, after ours)."""
    try:
        health = ctx.client.get("/v1/health")
    except CtlError:
        if not ctx.json:
            ctx.say(f"llmuxctl {__version__}")
        raise
    versions = {"llmuxctl": __version__, "llmuxd": health.get("version"),
                "llmuxd_pid": health.get("pid"), "socket": ctx.target.socket}
    if ctx.json:
        ctx.emit_json(versions)
    else:
        ctx.say(f"llmuxctl {__version__}")
        ctx.say(f"llmuxd {versions['llmuxd']} (pid {versions['llmuxd_pid']}, "
                f"socket {ctx.target.socket})")
    return EXIT_OK


def cmd_models(ctx: Context) -> int:
    """Model names, one a line, for shell completion: the daemon's, else the config's."""
    names: list[str] = []
    try:
        status = ctx.client.get("/v1/status", timeout=3.0)
        for name, model in (status.get("models") or {}).items():
            names.append(str(name))
            names.extend(str(a) for a in (model.get("aliases") or []))
    except CtlError:
        names = list(ctx.target.config_models)
    for name in names:
        ctx.say(name)
    return EXIT_OK


COMMANDS: dict[str, Callable[[Context], int]] = {
    "status": cmd_status,
    "start": cmd_start,
    "sleep": cmd_sleep,
    "wake": cmd_wake,
    "kill": cmd_kill,
    "switch": cmd_switch,
    "logs": cmd_logs,
    "reload": cmd_reload,
    "validate": cmd_validate,
    "version": cmd_version,
    "_models": cmd_models,
}
