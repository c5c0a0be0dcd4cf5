"""Relaying one child's answer to the client, and what the lease release reports.

Why it is built this way:

* No buffering: each piece the child sent goes to the client as it comes, so SSE
  events reach the client as the engine produces them. Under uvicorn a streamed
  answer is pushed (``push``): the child's protocol callback writes what each read
  brought, and the request's task wakes only at the end, on a failure, or when the
  client's buffer is full (reading from the child then pauses until it drains).
  Elsewhere (falcon.testing, answers with a Content-Length) it is iterated.
* The stream object owns the end of the exchange: ``close()`` (the fast path,
  llmuxd/proxy/fastpath.py, calls it in every case: body finished, client gone,
  child failed) returns or drops the upstream connection and releases the lease
  with the outcome, exactly once. Dropping the connection when the body did not
  finish is what makes vLLM see the request end and stop generating.
* A client that goes away (it closed, or the worker dropped it for not reading:
  ``client_write_timeout_secs``) aborts the upstream read at once through the
  connection's close callback, so nothing waits for the next token to notice.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmuxd.proxy.errors import error_body, sse_event
from llmuxd.proxy.upstream import Aborted, Connection, UpstreamClient, UpstreamError

# RFC 9110 §7.6.1 hop-by-hop headers, plus those the server or we set ourselves.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
_DROP_FROM_UPSTREAM = frozenset(
    name.encode() for name in HOP_BY_HOP | {"server", "date", "x-request-id"})
# The outcome of a request the stopping worker ended itself (fastpath.Exchange.run).
STOPPING = "front end stopping"


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

    def release_json(self, ended_at: float) -> builtins.bytes:  # "bytes" shadows the type
        """``release_body()`` as the JSON that json.dumps writes, without json.dumps
        (it is rendered on the hot path), plus when the request ended (monotonic: the
        release may be sent late)."""
        return (b'{"status": %d, "bytes": %d, "ttfb_ms": %s, "duration_ms": %s, "error": %s, '
                b'"ended_at": %.6f}') % (
            self.status, self.bytes,
            b"null" if self.ttfb_ms is None else repr(self.ttfb_ms).encode(),
            repr(round(self.duration_ms, 3)).encode(),
            b"null" if self.error is None else json.dumps(self.error).encode(), ended_at)


def response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The child's headers a client may see (hop-by-hop and our own dropped), names
    lowercased, as the ASGI server takes them."""
    named_by_connection = {
        token.strip().lower()
        for name, value in headers if name.lower() == b"connection"
        for token in value.split(b",")
    }
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lower = name.lower()
        if lower in _DROP_FROM_UPSTREAM or lower in named_by_connection:
            continue
        out.append((lower, value))
    return out


def _cancelled() -> bool:
    """The task is being cancelled: only uvicorn does that, to a stopping worker's
    requests (see fastpath.Exchange.run)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class ProxiedStream:
    """The answer's body: upstream pieces out; lease released on ``close()``."""

    def __init__(self, http: UpstreamClient, conn: Connection, started: float,
                 idle: float, deadline: float, outcome: Outcome, sse: bool,
                 on_close: Callable[[Outcome], None], client: Any = None) -> None:
        self.http = http
        self.conn = conn
        self.started = started
        self.idle = idle
        self.deadline = deadline
        self.outcome = outcome
        self.sse = sse
        self.on_close = on_close
        self.client = client  # worker.GuardedHttpProtocol, or None under falcon.testing
        self.complete = False
        self.failed = False
        self.closed = False
        if client is not None:
            client.on_lost(self.client_gone)

    def client_gone(self) -> None:
        """The client's connection closed: stop reading from the child now."""
        if not self.complete and self.outcome.error is None:
            self.outcome.error = "client disconnected"
        self.conn.abort(Aborted("client disconnected"))

    def __aiter__(self) -> ProxiedStream:
        return self

    async def __anext__(self) -> bytes:
        if self.failed:
            self._cut_client()
            raise StopAsyncIteration
        if self.complete:
            raise StopAsyncIteration
        try:
            chunk = await self.conn.read(self.idle, self.deadline)
        except Aborted:
            raise StopAsyncIteration from None
        except UpstreamError as exc:
            return self._fail(exc)
        if not chunk:
            self.complete = True
            raise StopAsyncIteration
        if self.outcome.ttfb_ms is None:
            self.outcome.ttfb_ms = round((time.monotonic() - self.started) * 1000.0, 3)
        self.outcome.bytes += len(chunk)
        conn = self.conn
        if conn.done and not conn.chunks and conn.error is None:
            # The answer's last piece: the caller can send it as the end of the body
            # (one ASGI send fewer for a whole answer that came in one read).
            self.complete = True
        return chunk

    async def push(self, write: Callable[[bytes], None], flow: Any) -> None:
        """Relay the rest of the body by writing each piece from the child's protocol
        callback as it arrives (``write`` frames it for the client), not through this
        task: one task wake-up per answer instead of one per piece, which is most of a
        piece's relay cost with hundreds of open streams. ``flow`` is the ASGI
        server's flow control of the client's connection: when its buffer is full,
        reading from the child pauses until it drains (so at most the transport's
        buffer waits here, as with ``read``).

        Ends like iterating: the answer ended (``complete``), the child failed (an SSE
        client gets an error event, then the connection is cut), or the client left."""
        conn = self.conn
        outcome = self.outcome
        started = self.started

        def sink(piece: bytes) -> None:
            if outcome.ttfb_ms is None:
                outcome.ttfb_ms = round((time.monotonic() - started) * 1000.0, 3)
            outcome.bytes += len(piece)
            write(piece)
            if flow.write_paused:
                conn.pause_for_reader()

        conn.push_to(sink)
        while True:
            try:
                await conn.wait_pushed(self.idle, self.deadline)
            except Aborted:
                return
            except UpstreamError as exc:
                try:
                    write(self._fail(exc))
                except StopAsyncIteration:
                    return
                self._cut_client()
                return
            if conn.done:
                self.complete = True
                return
            if conn.paused:
                await flow.drain()
                conn.resume_for_reader()

    def _fail(self, exc: UpstreamError) -> bytes:
        """The child died or stalled mid-answer: tell an SSE client, then cut it off."""
        self.failed = True
        self.outcome.error = f"upstream failed mid-response: {exc}"
        # The client connection is cut after this last piece, so the answer reads as
        # broken (no final chunk) rather than complete.
        if self.sse:
            return sse_event(error_body("the model server failed while streaming",
                                        "upstream_error", "upstream_error"))
        self._cut_client()
        raise StopAsyncIteration

    def _cut_client(self) -> None:
        if self.client is not None:
            self.client.abort()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.client is not None:
            self.client.remove_on_lost(self.client_gone)
        if self.complete and self.conn.reusable:
            self.http.give_back(self.conn)
        else:
            self.conn.close()
            if not self.complete and not self.failed and self.outcome.error is None:
                self.outcome.error = STOPPING if _cancelled() else "client disconnected"
        self.outcome.duration_ms = (time.monotonic() - self.started) * 1000.0
        self.on_close(self.outcome)
