"""Forwarding one request to a model's vLLM child and streaming the answer back.

Why it is built this way:

* Connection reuse: a worker's threads share kept-alive connections per upstream
  port (most recently used first), so a request costs no TCP handshake to the
  child, and a connection the child closed while idle is noticed before use.
* No buffering: the answer is read piece by piece as it arrives (whatever one
  ``recv`` returned, at most one upstream chunk) and handed to gunicorn at once,
  so SSE events reach the client as the engine produces them.
* The response body is an iterable whose ``close()`` (called by gunicorn in every
  case: body finished, client gone, write failed) returns or closes the upstream
  connection and releases the lease with the outcome. Closing the socket when the
  body did not finish is what makes vLLM see the request end and stop generating.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmuxd.proxy.errors import error_body
from llmuxd.proxy.http1 import Connection, Head, PeerClosed, Pool, tcp_connector, unix_connector

# RFC 9110 §7.6.1 hop-by-hop headers, plus those gunicorn or we set ourselves.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
_DROP_FROM_UPSTREAM = HOP_BY_HOP | {"server", "date", "x-request-id"}

_RETRYABLE = (PeerClosed, ConnectionResetError, BrokenPipeError)


class UpstreamError(Exception):
    """The child could not be reached, or broke off before answering."""


class UpstreamPool:
    """Kept-alive connections to 127.0.0.1:<port> of the children, shared by threads."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._pools: dict[tuple[str, int], Pool] = {}
        self._lock = threading.Lock()

    def _pool(self, host: str, port: int) -> Pool:
        pool = self._pools.get((host, port))
        if pool is None:
            with self._lock:
                connect = (unix_connector(host.removeprefix("unix:"), self.timeout)
                           if host.startswith("unix:")   # a child on a Unix socket
                           else tcp_connector(host, port, self.timeout))
                pool = self._pools.setdefault((host, port), Pool(connect))
        return pool

    def take(self, host: str, port: int) -> Connection:
        """An idle kept-alive connection to host:port, or a new one."""
        return self._pool(host, port).take()

    def give_back(self, host: str, port: int, conn: Connection) -> None:
        """Keep a connection whose last response was read to its end."""
        self._pool(host, port).give_back(conn)


@dataclass
class Outcome:
    """What the lease release (and the request's log line) report."""

    status: int = 0
    bytes: int = 0
    ttfb_ms: float | None = None
    duration_ms: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def release_body(self) -> dict[str, Any]:
        return {"status": self.status, "bytes": self.bytes, "ttfb_ms": self.ttfb_ms,
                "duration_ms": round(self.duration_ms, 3), "error": self.error}


def open_upstream(pool: UpstreamPool, host: str, port: int, method: str, path: str,
                  body: bytes, headers: dict[str, str]) -> tuple[Connection, Head]:
    """Send the request and read the answer's head; UpstreamError if that fails."""
    authority = "localhost" if host.startswith("unix:") else f"{host}:{port}"
    lines = [f"{method} {path} HTTP/1.1\r\nHost: {authority}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
    lines.append("\r\n")
    request = "".join(lines).encode("latin-1") + body
    conn = pool.take(host, port)
    for attempt in (0, 1):
        try:
            reused = conn.sock is not None
            conn.send(request, pool.timeout)
            return conn, conn.read_head()
        except _RETRYABLE as exc:
            conn.close()
            # A kept-alive connection the child closed while idle: one fresh try.
            if reused and attempt == 0:
                continue
            raise UpstreamError(_describe(exc, host, port)) from None
        except (OSError, ValueError, UnicodeError) as exc:
            conn.close()
            raise UpstreamError(_describe(exc, host, port)) from None
    raise AssertionError("unreachable")


def _describe(exc: BaseException, host: str, port: int) -> str:
    where = host if host.startswith("unix:") else f"{host}:{port}"
    if isinstance(exc, ConnectionRefusedError | FileNotFoundError):
        return f"connection refused by {where}"
    if isinstance(exc, TimeoutError):
        return f"no answer from {where} in time"
    if isinstance(exc, PeerClosed):
        return f"{where} closed the connection without answering"
    return f"{where}: {type(exc).__name__}: {exc}"


def response_headers(head: Head) -> list[tuple[str, str]]:
    """The child's headers a client may see (hop-by-hop and duplicates dropped)."""
    named_by_connection = {
        token.strip().lower()
        for name, value in head.headers if name.lower() == "connection"
        for token in value.split(",")
    }
    return [(name, value) for name, value in head.headers
            if name.lower() not in _DROP_FROM_UPSTREAM
            and name.lower() not in named_by_connection]


class ProxiedBody:
    """The WSGI response iterable: upstream chunks out, lease released on close()."""

    def __init__(self, pool: UpstreamPool, host: str, port: int, conn: Connection,
                 head: Head, started: float, outcome: Outcome, on_close: Callable[[Outcome], None],
                 client_socket: socket.socket | None = None) -> None:
        self.pool = pool
        self.host = host
        self.port = port
        self.conn = conn
        self.started = started
        self.outcome = outcome
        self.on_close = on_close
        self.client_socket = client_socket
        self.sse = (head.get("content-type") or "").startswith("text/event-stream")
        self.complete = False
        self.failed = False
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self.failed:
            self._abort_client()
            raise StopIteration
        if self.complete:
            raise StopIteration
        try:
            chunk = self.conn.read_some()
        except (OSError, ValueError) as exc:
            return self._fail(exc)
        if not chunk:
            self.complete = True
            raise StopIteration
        if self.outcome.ttfb_ms is None:
            self.outcome.ttfb_ms = round((time.monotonic() - self.started) * 1000.0, 3)
        self.outcome.bytes += len(chunk)
        return chunk

    def _fail(self, exc: BaseException) -> bytes:
        """The child died mid-answer: tell an SSE client, then cut the client off."""
        self.failed = True
        self.outcome.error = f"upstream failed mid-response: {_describe(exc, self.host, self.port)}"
        # The client connection is aborted after the last chunk (see __next__), so
        # the answer reads as broken (no final chunk) rather than complete.
        if self.sse:
            message = "the model server failed while streaming"
            return b"data: " + error_body(message, "upstream_error", "upstream_error") + b"\n\n"
        self._abort_client()
        raise StopIteration

    def _abort_client(self) -> None:
        if self.client_socket is not None:
            with contextlib.suppress(OSError):
                self.client_socket.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.complete and self.conn.reusable:
            self.pool.give_back(self.host, self.port, self.conn)
        else:
            # The client left, the child failed, or it wants to close: drop the
            # socket so the child sees the request end and stops generating.
            self.conn.close()
            if not self.complete and not self.failed and self.outcome.error is None:
                self.outcome.error = "client disconnected"
        self.outcome.duration_ms = (time.monotonic() - self.started) * 1000.0
        self.on_close(self.outcome)
