"""Forwarding one request to a model's vLLM child and streaming the answer back.

Why it is built this way:

* Connection reuse: each worker thread keeps one kept-alive connection per
  upstream port, so a request costs no TCP handshake to the child.
* No buffering: the answer is read with ``read1`` (whatever has arrived, at most
  one chunk of the upstream's transfer encoding) and handed to gunicorn at once,
  so SSE events reach the client as the engine produces them.
* The response body is an iterable whose ``close()`` (called by gunicorn in every
  case: body finished, client gone, write failed) returns or closes the upstream
  connection and releases the lease with the outcome. Closing the socket when the
  body did not finish is what makes vLLM see the request end and stop generating.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmuxd.proxy.errors import error_body

CHUNK = 65536

# RFC 9110 §7.6.1 hop-by-hop headers, plus those gunicorn or we set ourselves.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
_DROP_FROM_UPSTREAM = HOP_BY_HOP | {"server", "date", "x-request-id"}

_RETRYABLE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
              http.client.CannotSendRequest)


class UpstreamError(Exception):
    """The child could not be reached, or broke off before answering."""


class UpstreamPool:
    """Per-thread kept-alive connections to 127.0.0.1:<port> of the children."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._local = threading.local()

    def _conns(self) -> dict[tuple[str, int], http.client.HTTPConnection]:
        conns: dict[tuple[str, int], http.client.HTTPConnection] | None = getattr(
            self._local, "conns", None)
        if conns is None:
            conns = {}
            self._local.conns = conns
        return conns

    def take(self, host: str, port: int) -> tuple[http.client.HTTPConnection, bool]:
        """A connection for this thread (reused if one is idle), and whether it was."""
        conn = self._conns().pop((host, port), None)
        if conn is not None:
            return conn, True
        return http.client.HTTPConnection(host, port, timeout=self.timeout), False

    def give_back(self, host: str, port: int, conn: http.client.HTTPConnection) -> None:
        """Keep a connection whose last response was read to its end."""
        old = self._conns().pop((host, port), None)
        if old is not None:
            old.close()
        self._conns()[(host, port)] = conn


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
                  body: bytes, headers: dict[str, str]
                  ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send the request and read the answer's head; UpstreamError if that fails."""
    for attempt in (0, 1):
        conn, reused = pool.take(host, port)
        try:
            conn.request(method, path, body, headers)
            return conn, conn.getresponse()
        except _RETRYABLE as exc:
            conn.close()
            # A kept-alive connection the child closed while idle: one fresh try.
            if reused and attempt == 0:
                continue
            raise UpstreamError(_describe(exc, host, port)) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise UpstreamError(_describe(exc, host, port)) from None
    raise AssertionError("unreachable")


def _describe(exc: BaseException, host: str, port: int) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {host}:{port}"
    if isinstance(exc, TimeoutError):
        return f"no answer from {host}:{port} in time"
    if isinstance(exc, http.client.RemoteDisconnected):
        return f"{host}:{port} closed the connection without answering"
    return f"{host}:{port}: {type(exc).__name__}: {exc}"


def response_headers(resp: http.client.HTTPResponse) -> list[tuple[str, str]]:
    """The child's headers a client may see (hop-by-hop and duplicates dropped)."""
    named_by_connection = {
        token.strip().lower()
        for value in resp.headers.get_all("connection") or ()
        for token in value.split(",")
    }
    return [(name, value) for name, value in resp.getheaders()
            if name.lower() not in _DROP_FROM_UPSTREAM
            and name.lower() not in named_by_connection]


class ProxiedBody:
    """The WSGI response iterable: upstream chunks out, lease released on close()."""

    def __init__(self, pool: UpstreamPool, host: str, port: int,
                 conn: http.client.HTTPConnection, resp: http.client.HTTPResponse,
                 started: float, outcome: Outcome, on_close: Callable[[Outcome], None],
                 client_socket: socket.socket | None = None) -> None:
        self.pool = pool
        self.host = host
        self.port = port
        self.conn = conn
        self.resp = resp
        self.started = started
        self.outcome = outcome
        self.on_close = on_close
        self.client_socket = client_socket
        self.sse = (resp.getheader("content-type") or "").startswith("text/event-stream")
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
            chunk = self.resp.read1(CHUNK)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return self._fail(exc)
        if not chunk:
            if self.resp.length:  # Content-Length promised more than came
                return self._fail(http.client.IncompleteRead(b"", self.resp.length))
            self.complete = True
            # read1 leaves a Content-Length response open at its end; closing it
            # (not the socket) lets the connection carry the next request.
            self.resp.close()
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
        if self.complete and not self.resp.will_close:
            self.pool.give_back(self.host, self.port, self.conn)
        else:
            # The client left, the child failed, or it wants to close: drop the
            # socket so the child sees the request end and stops generating.
            self.conn.close()
            if not self.complete and not self.failed and self.outcome.error is None:
                self.outcome.error = "client disconnected"
        self.outcome.duration_ms = (time.monotonic() - self.started) * 1000.0
        self.on_close(self.outcome)
