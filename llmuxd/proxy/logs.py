"""Logging of the front end: structlog JSON lines on stdout, gunicorn's too.

The front end runs as gunicorn processes under llmuxd (or its own systemd unit),
so its stdout goes to the journal: one JSON object per line, ISO UTC timestamps,
and gunicorn's own stdlib logging routed through the same renderer so nothing
arrives as unparseable free text.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import structlog
from gunicorn import glogging

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure() -> None:
    """Configure structlog for a gunicorn master or worker process."""
    structlog.configure(
        processors=[*_SHARED, structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer()],
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=True,
    )


def _json_formatter() -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer()],
        foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name,
                           structlog.processors.format_exc_info],
    )


class GunicornLogger(glogging.Logger):
    """gunicorn's own lines in the same JSON shape, and no access log.

    A ``logconfig_dict`` would do the formatting too, but its mere presence makes
    gunicorn build the access-log atoms of every request (a few % of the worker's
    CPU) even when nothing logs them; the app writes its own line per request."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        self._access_log_enabled = False
        formatter = _json_formatter()
        for handler in self.error_log.handlers:
            handler.setFormatter(formatter)

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        return


class _Stamp:
    """Level and ISO UTC timestamp, with the seconds part formatted once per second."""

    def __init__(self) -> None:
        self.second = -1
        self.text = ""

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]
                 ) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["level"] = method
        event["timestamp"] = f"{self.text}.{int((now - second) * 1e6):06d}Z"
        return event


def lazy_delay(default: float = 0.020) -> float:
    """How late a line nobody waits for may leave (lease notices and releases, request
    log lines), to share a write with others. ``LLMUX_LAZY_FLUSH_SECS`` overrides it:
    tests set an hour, so that only a stopping worker's final flush can deliver what
    it held back. Anything but a number from 0 to 3600 keeps the default."""
    try:
        value = float(os.environ.get("LLMUX_LAZY_FLUSH_SECS", ""))
    except ValueError:
        return default
    return value if 0.0 <= value <= 3600.0 else default


class _StepBuffered:
    """stdout for the per-request lines: written at most ``DELAY`` seconds late, many
    lines per write.

    Why: structlog's WriteLogger flushes after every line, a write(2) per request;
    one write per event-loop step was still one per request at low concurrency (P1),
    taken on the worker's CPU just as the client sends its next request. A line waits
    at most ``DELAY`` (or until ``MAX_LINES`` wait), and whatever waits is written at
    the worker's exit; outside an event loop (tests, tools) each line is written at
    once."""

    DELAY = lazy_delay()
    MAX_LINES = 256

    def __init__(self, out: Any = None) -> None:
        self.out = out
        self.lines: list[str] = []
        self.timer: asyncio.TimerHandle | None = None
        atexit.register(self.write_out)

    def write(self, text: str) -> None:
        self.lines.append(text)

    def flush(self) -> None:
        n = len(self.lines)
        if n >= self.MAX_LINES:
            self.write_out()
        elif n == 1 and self.timer is None:
            try:
                self.timer = asyncio.get_running_loop().call_later(self.DELAY,
                                                                   self.write_out)
            except RuntimeError:
                self.write_out()

    def write_out(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.lines:
            return
        lines, self.lines = self.lines, []
        out = self.out or sys.stdout
        out.write("".join(lines))
        out.flush()


def _line_encoder() -> Any:
    """``json.dumps(fields, default=repr)`` for the per-request line, with the C encoder
    made once: JSONEncoder.encode builds a new one (and a circular-reference memo) on
    every call, most of what it costs for a flat dict of scalars."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has it
        return json.JSONEncoder(default=repr).encode
    encoder = make(None, repr, json.encoder.encode_basestring_ascii, None, ": ", ", ",
                   False, False, True)

    def encode(fields: dict[str, Any]) -> str:
        return "".join(encoder(fields, 0))

    return encode


class RequestLog:
    """The per-request line, rendered directly: the JSON structlog's JSONRenderer
    writes after ``_Stamp`` (same keys, same order), without structlog's bound-logger
    call chain, context copy and lock, which were ~6 % of a worker's CPU at P2 load."""

    def __init__(self) -> None:
        self.stamp = _Stamp()
        self.out = _StepBuffered()
        self.encode = _line_encoder()

    def info(self, event: str, **fields: Any) -> None:
        fields["event"] = event
        self.stamp(None, "info", fields)
        self.out.write(self.encode(fields) + "\n")
        self.out.flush()

    def proxied(self, request_id: str, path: str, model: str, served_model: str,
                status: int, error: str | None, waited_ms: float, lease_ms: float,
                switched: bool, nbytes: int, ttfb_ms: float | None, upstream_ms: float,
                duration_ms: float) -> None:
        """The line of a proxied request, exactly as ``info("request", ...)`` writes it
        with these fields in this order (tests/proxy/test_log_batching.py compares),
        formatted in one step: it is written once per request."""
        stamp = self.stamp(None, "info", {})["timestamp"]
        v = _json_value
        self.out.write(_PROXIED % (
            v(request_id), v(path), v(model), v(served_model), v(status), v(error),
            v(waited_ms), v(lease_ms), v(switched), v(nbytes), v(ttfb_ms), v(upstream_ms),
            v(duration_ms), stamp))
        self.out.flush()


_PROXIED = ('{"request_id": %s, "method": "POST", "path": %s, "model": %s, '
            '"served_model": %s, "status": %s, "error": %s, "waited_ms": %s, '
            '"lease_ms": %s, "switched": %s, "bytes": %s, "ttfb_ms": %s, "upstream_ms": %s, '
            '"duration_ms": %s, "event": "request", "level": "info", "timestamp": "%s"}\n')
_encode_str = json.encoder.encode_basestring_ascii
_encode_any = json.JSONEncoder(default=repr).encode


def _json_value(value: Any) -> str:
    """One value as json.dumps(default=repr) writes it (the common types directly)."""
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int or (kind is float and math.isfinite(value)):
        return repr(value)
    return _encode_any(value)


_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class _RandomIds:
    """Fresh request ids, 12 random bytes each, cut from one getrandom(2) per 256 ids
    (a system call per request was a measurable share of the worker's CPU); a forked
    worker starts its own pool, so no two processes hand out the same ids."""

    SIZE = 12
    BATCH = 256

    def __init__(self) -> None:
        self.pool = b""
        self.at = 0
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.pool, self.at = b"", 0

    def __call__(self) -> str:
        at = self.at
        if at >= len(self.pool):
            self.pool, at = os.urandom(self.SIZE * self.BATCH), 0
        self.at = at + self.SIZE
        return self.pool[at:at + self.SIZE].hex()


_fresh_id = _RandomIds()


def request_id(given: str | None) -> str:
    """The client's X-Request-Id when it is a safe token (it goes into log lines and
    the child's request), else a fresh random one."""
    return given if given and _REQUEST_ID_RE.fullmatch(given) else _fresh_id()


def request_logger() -> Any:
    """The logger of the canonical per-request line (``RequestLog``)."""
    return RequestLog()
