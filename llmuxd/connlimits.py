"""Bounds shared by llmuxd's two listeners (control socket, metrics port).

Why: both servers run one thread per connection. Without a cap, 300 idle TCP
connections to the metrics port meant 300 threads in the daemon; without a
timeout an idle or half-sent request holds its thread forever; and a failed
``Thread.start`` (the OS out of threads) used to end the accept loop for good.
``ConnectionGate`` holds the cap and starts connection threads, closing the
connection and backing off (instead of dying) when the OS refuses a thread.
``content_length`` is the one strict parser of that header: ASCII digits only
(``str.isdigit`` accepts ``²``, which ``int`` then rejects), and bounded.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Callable
from typing import Any, Literal

import structlog

log = structlog.get_logger("llmuxd.connlimits")

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0
_DIGITS = re.compile(r"[0-9]{1,12}")
Admission = Literal["taken", "full", "failed"]


class BadContentLength(ValueError):
    """The Content-Length header is not a plain, bounded, ASCII decimal number."""


def content_length(values: list[str], limit: int) -> int:
    """The body length the headers announce (0 when absent), checked strictly.

    ``values``: every Content-Length header of the request (several that differ are
    refused, as RFC 9112 section 6.3 asks). Raises BadContentLength with a message
    fit for a 400 answer.
    """
    distinct = {v.strip() for v in values}
    if not distinct:
        return 0
    if len(distinct) > 1:
        raise BadContentLength("bad Content-Length: several different values")
    text = distinct.pop()
    if not _DIGITS.fullmatch(text):
        raise BadContentLength(f"bad Content-Length: {text[:40]!r} is not a decimal "
                               "number of bytes")
    n = int(text)
    if n > limit:
        raise BadContentLength(f"Content-Length {n} is over the limit of {limit} bytes")
    return n


class ConnectionGate:
    """At most ``cap`` live connections, each on its own thread.

    The accept loop calls ``admit`` for every accepted connection. Over the cap the
    caller answers with a refusal; when the thread will not start, the connection is
    closed and the accept loop is slowed down (a doubling backoff up to
    BACKOFF_MAX) so that it neither dies nor spins.
    The thread body must call ``leave`` when its connection ends.
    """

    def __init__(self, cap: int, name: str) -> None:
        self.cap = cap
        self.name = name
        self._live = 0
        self._lock = threading.Lock()
        self._delay = 0.0
        self._stop = threading.Event()

    @property
    def live(self) -> int:
        return self._live

    def admit(self, conn: socket.socket, target: Callable[..., Any]) -> Admission:
        """Take ``conn`` on a new thread running ``target(conn)``.

        "taken": the thread owns ``conn``; "full": over the cap, ``conn`` untouched
        (the caller refuses it); "failed": no thread, ``conn`` closed here.
        """
        with self._lock:
            if self._live >= self.cap:
                return "full"
            self._live += 1
        try:
            threading.Thread(target=target, args=(conn,), name=f"{self.name}-conn",
                             daemon=True).start()
        except RuntimeError as exc:     # "can't start new thread"
            self.leave()
            with contextlib.suppress(OSError):
                conn.close()
            self._delay = min(BACKOFF_MAX, max(BACKOFF_FIRST, self._delay * 2))
            log.error("connection_thread_failed", server=self.name, error=str(exc),
                      live=self._live, backoff_s=self._delay)
            self._stop.wait(self._delay)
            return "failed"
        self._delay = 0.0
        return "taken"

    def leave(self) -> None:
        with self._lock:
            self._live -= 1

    def close(self) -> None:
        """Wake an accept loop sleeping in its backoff (shutdown)."""
        self._stop.set()


def refuse(conn: socket.socket, response: bytes) -> None:
    """Answer a connection over the cap with ``response`` and close it, never blocking."""
    try:
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.send(response)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
    finally:
        conn.close()
