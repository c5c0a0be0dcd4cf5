"""Human renderings of the daemon's answers: the status table and its cells.

Why a separate module: ``--json`` prints the daemon's data untouched, and everything a
person reads is built here from that same data, so the two can never disagree about
facts, only about layout.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from llmuxctl.errors import first_line

COLUMNS = ("MODEL", "STATE", "SLEEP", "PID", "PORT", "IN-FLIGHT", "QUEUED", "QUANTUM",
           "IDLE", "GPU MEM", "IN STATE", "LAST SWITCH")
RIGHT = frozenset({"PID", "PORT", "IN-FLIGHT", "QUEUED", "QUANTUM", "IDLE", "GPU MEM"})


def duration(secs: float | None) -> str:
    """Seconds as supervisorctl's uptime: ``0:05:12``, ``2d 3:04:05``; '-' when unknown."""
    if secs is None or secs < 0:
        return "-"
    total = int(secs)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{seconds:02d}"
    return f"{days}d {clock}" if days else clock


def ago(secs: float | None) -> str:
    """A short age: ``12s``, ``5m``, ``3h``, ``2d``."""
    if secs is None or secs < 0:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{int(secs // size)}{unit}"
    return f"{int(secs)}s"


def mib(value: Any) -> str:
    """Total MiB of a ``{gpu index: MiB}`` map (or a number); '-' when nothing is known."""
    if isinstance(value, Mapping):
        numbers = [v for v in value.values() if isinstance(v, int | float)]
        if not numbers:
            return "-"
        return f"{int(sum(numbers))} MiB"
    if isinstance(value, int | float):
        return f"{int(value)} MiB"
    return "-"


def sleep_cell(status: Mapping[str, Any]) -> str:
    level = status.get("sleep_level")
    return f"L{level}" if level else "-"


def last_switch_cell(switch: Any, now: float) -> str:
    """``gemma-12b->qwen-14b ok 3.42s, 5m ago`` (``->qwen-14b`` when none left); '-' if never."""
    if not isinstance(switch, Mapping) or not switch:
        return "-"
    src = switch.get("from") or ""   # none: nothing had to leave the GPU
    dst = switch.get("to") or "?"
    parts = [f"{src}->{dst}", str(switch.get("result") or "?")]
    total = switch.get("total_ms")
    if isinstance(total, int | float):
        parts.append(f"{total / 1000:.2f}s")
    cell = " ".join(parts)
    started = switch.get("started_at")
    if isinstance(started, int | float):
        cell += f", {ago(now - started)} ago"
    return cell


def seconds_cell(value: Any) -> str:
    """``2.4s`` / ``3m`` for a number of seconds; '-' when none; ``?`` when unknown (-1)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    if value < 0:
        return "?"
    return f"{value:.1f}s" if value < 60 else ago(value)


def _sched(status: Mapping[str, Any]) -> Mapping[str, Any]:
    sched = status.get("scheduling")
    return sched if isinstance(sched, Mapping) else {}


def scheduling_lines(status: Mapping[str, Any]) -> list[str]:
    """``policy: adaptive``, then one line per model that waits: how long and why."""
    lines: list[str] = []
    daemon = status.get("daemon")
    policy = daemon.get("policy") if isinstance(daemon, Mapping) else None
    if policy:
        lines.append(f"policy: {policy}")
    models = status.get("models")
    for m in (models.values() if isinstance(models, Mapping) else []):
        if not isinstance(m, Mapping):
            continue
        sched = _sched(m)
        waiting = sched.get("waiting")
        if not waiting or m.get("state") == "active":
            continue
        why = sched.get("why_waiting") or "waiting for the next scheduling pass"
        oldest = seconds_cell(sched.get("oldest_wait_s"))
        lines.append(f"{m.get('name')}: {waiting} waiting (oldest {oldest}): {why}")
    return lines


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def status_row(status: Mapping[str, Any], now: float) -> list[str]:
    since = status.get("state_since")
    in_state = now - since if isinstance(since, int | float) else None
    return [
        _cell(status.get("name")),
        _cell(status.get("state")).upper(),
        sleep_cell(status),
        _cell(status.get("pid")),
        _cell(status.get("port")),
        _cell(status.get("in_flight")),
        _cell(status.get("queued")),
        seconds_cell(_sched(status).get("quantum_left_s")),
        seconds_cell(_sched(status).get("idle_s")),
        mib(status.get("gpu_memory_mib")),
        duration(in_state),
        last_switch_cell(status.get("last_switch"), now),
    ]


def align(header: Sequence[str], rows: Iterable[Sequence[str]],
          right: frozenset[str] = frozenset()) -> list[str]:
    """Rows padded into columns two spaces apart; numbers right-aligned under their header."""
    body = [list(r) for r in rows]
    table = [list(header), *body]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = []
    for n, row in enumerate(table):
        cells = []
        for i, cell in enumerate(row):
            if n > 0 and header[i] in right:
                cells.append(cell.rjust(widths[i]))
            else:
                cells.append(cell.ljust(widths[i]))
        lines.append("  ".join(cells).rstrip())
    return lines


def status_table(models: Sequence[Mapping[str, Any]], now: float | None = None) -> list[str]:
    """The supervisorctl-like table of models, then one line per model's last error."""
    now = time.time() if now is None else now
    lines = align(COLUMNS, [status_row(m, now) for m in models], RIGHT)
    for m in models:
        err = m.get("last_error")
        if err:
            text = str(err)
            first = first_line(text)
            more = f" (see: llmuxctl logs {m.get('name')})" if first != text.strip() else ""
            lines.append(f"{m.get('name')}: last error: {first}{more}")
    return lines


def gpu_lines(gpus: Any) -> list[str]:
    """``GPU 0 Simulated H100: 75059 / 81920 MiB used`` for each GPU the daemon reports."""
    lines: list[str] = []
    if not isinstance(gpus, list):
        return lines
    for gpu in gpus:
        if not isinstance(gpu, Mapping):
            continue
        name = f" {gpu['name']}" if gpu.get("name") else ""
        used, total = gpu.get("used_mib"), gpu.get("total_mib")
        lines.append(f"GPU {gpu.get('index', '?')}{name}: {_cell(used)} / {_cell(total)} MiB used")
    return lines


def state_phrase(status: Mapping[str, Any]) -> str:
    """How a model stands after an operation: ``active (pid 123, port 8001)``, ``asleep at L1``."""
    state = str(status.get("state") or "unknown")
    if state == "sleeping" and status.get("sleep_level"):
        return f"asleep at L{status['sleep_level']} (pid {_cell(status.get('pid'))})"
    if status.get("pid") and state in ("active", "starting", "waking", "draining"):
        return f"{state} (pid {status['pid']}, port {_cell(status.get('port'))})"
    return state
