"""The gunicorn worker: uvicorn's, on uvloop and httptools, with llmux's guards.

One asyncio event loop per worker process serves thousands of connections; what
a thread per connection used to bound, these bound instead:

* ``head_timeout_secs``: from the first byte of a request (or the connection's
  opening) to the end of its head; a client that sends half a head is dropped.
  uvicorn itself only times out idle kept-alive connections.
* ``body_timeout_secs``: from the end of the head to the end of the body.
* ``client_write_timeout_secs``: a client that does not read while we have
  data for it (the transport's write buffer stays full) for this long is
  dropped. Dropping it runs the connection's close callbacks: the proxied
  request's upstream is aborted and its lease released (llmuxd/proxy/app.py).
* ``max_connections``: uvicorn's ``limit_concurrency`` per worker (503 above).

The app finds its connection in the ASGI scope under ``llmux.conn`` (``on_lost``
callbacks and ``abort``); under falcon.testing there is none, and the app copes.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from gunicorn.arbiter import Arbiter
from uvicorn import Server
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker

from llmuxd.config import load_config
from llmuxd.proxy.errors import error_body

_OVER_LIMIT = error_body("too many connections to this llmux worker; retry shortly",
                         "service_unavailable_error", "too_many_connections")


async def _over_limit(scope: Any, receive: Any, send: Any) -> None:
    """uvicorn's answer past ``limit_concurrency``, in the OpenAI error shape."""
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(_OVER_LIMIT)).encode()),
                            (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": _OVER_LIMIT, "more_body": False})


# uvicorn looks this name up in its module for every request over the limit; its own
# answer is plain text, which OpenAI clients cannot parse.
httptools_impl.service_unavailable = _over_limit


class HeadCoalescer:
    """The transport one request/response cycle writes to: the answer's head waits for
    its first body piece, so that a small answer leaves in one send, not two.

    Why: on loopback each send also runs the receiver's TCP path on our CPU; uvicorn
    writes the status line and headers, then each body piece, separately. The head
    is held at most until the end of the current event-loop step (``call_soon``), so
    a stream whose first piece comes later still gets its head at once. Only the
    cycle's first write is held; every later write goes out as it comes (after the
    held head, in order)."""

    __slots__ = ("first", "held", "loop", "transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.held = b""
        self.first = True

    def write(self, data: bytes) -> None:
        if self.first:
            self.first = False
            self.held = data
            self.loop.call_soon(self.flush)
            return
        if self.held:
            data, self.held = self.held + data, b""
        self.transport.write(data)

    def flush(self) -> None:
        if self.held:
            held, self.held = self.held, b""
            if not self.transport.is_closing():
                self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return bool(self.transport.is_closing())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus head, body and write timeouts and close hooks."""

    head_timeout = 10.0
    body_timeout = 60.0
    write_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard: asyncio.TimerHandle | None = None
        self._guarding: str | None = None  # what the armed guard waits for
        self._phase: str | None = None     # what the request being read still lacks
        self._write_guard: asyncio.TimerHandle | None = None
        # Insertion-ordered, removal by key: a request adds and removes two of these.
        self._lost: dict[Callable[[], None], None] = {}

    # -- the app's handle ----------------------------------------------------

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once if the connection closes or is dropped."""
        self._lost[callback] = None

    def remove_on_lost(self, callback: Callable[[], None]) -> None:
        self._lost.pop(callback, None)

    def abort(self) -> None:
        """Cut the client off (a broken stream must not look complete)."""
        if self.transport is not None:
            self.transport.abort()

    # -- timers --------------------------------------------------------------

    def _arm(self, seconds: float, what: str) -> None:
        if self._guard is not None:
            self._guard.cancel()
        self._guard = self.loop.call_later(seconds, self._expired, what)
        self._guarding = what

    def _disarm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None
            self._guarding = None

    def _expired(self, what: str) -> None:
        self._guard = None
        self._guarding = None
        self.logger.info("dropping a client that did not send its request %s in time", what)
        self.transport.abort()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.head_timeout, "head")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # The guard for what the request still lacks after this read, armed here and
        # not in the parser's callbacks: a request that came whole in one read (the
        # common case) arms no timer at all, where arming per phase cost two timers
        # and two cancels per request.
        phase = self._phase
        if phase is not None and phase != self._guarding:
            self._arm(self.head_timeout if phase == "head" else self.body_timeout, phase)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["llmux.conn"] = self  # type: ignore[typeddict-unknown-key]
        self._phase = "head"  # a guard armed at the connection's opening keeps running

    def on_headers_complete(self) -> None:
        self._phase = "body"
        super().on_headers_complete()
        # The cycle was just made (its task has not run yet, or it waits in the pipeline).
        self.cycle.transport = HeadCoalescer(self.transport, self.loop)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self._phase = None
        self._disarm()
        super().on_message_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_guard is None:
            self._write_guard = self.loop.call_later(self.write_timeout, self._write_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_guard is not None:
            self._write_guard.cancel()
            self._write_guard = None

    def _write_expired(self) -> None:
        self._write_guard = None
        self.logger.info("dropping a client that stopped reading its answer")
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._write_guard is not None:
            self._write_guard.cancel()
            self._write_guard = None
        callbacks, self._lost = list(self._lost), {}
        super().connection_lost(exc)
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one bad callback must not skip the others
                self.logger.exception("connection close callback failed")


def configure_protocol() -> tuple[int, float]:
    """Set the guards from the llmux config; returns (max_connections, how long a
    stopping worker lets its requests run before it ends them itself)."""
    config = load_config(os.environ.get("LLMUX_CONFIG", "/etc/llmux.toml"))
    proxy = config.proxy
    GuardedHttpProtocol.head_timeout = proxy.head_timeout_secs
    GuardedHttpProtocol.body_timeout = proxy.body_timeout_secs
    GuardedHttpProtocol.write_timeout = proxy.client_write_timeout_secs
    return proxy.max_connections, shutdown_grace(math.ceil(proxy.graceful_secs))


def shutdown_grace(graceful_timeout: float) -> float:
    """How long a stopping worker waits for its requests before it cancels them: a
    little less than gunicorn's ``graceful_timeout`` (``[proxy]
    graceful_timeout_secs``), so that the requests still running end here — an SSE
    error event or a 503 to their clients, their leases released, their log lines
    written — instead of being killed with the worker (no line, no outcome, a reset
    connection)."""
    return max(0.0, graceful_timeout - min(2.0, 0.2 * graceful_timeout))


class LlmuxWorker(UvicornWorker):
    """gunicorn worker class ``llmuxd.proxy.worker.LlmuxWorker``."""

    CONFIG_KWARGS: dict[str, Any] = {"loop": "uvloop", "http": GuardedHttpProtocol,
                                     "lifespan": "off", "server_header": False,
                                     "date_header": True, "proxy_headers": False,
                                     "access_log": False}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        limit, grace = configure_protocol()
        self.CONFIG_KWARGS = {**self.CONFIG_KWARGS, "limit_concurrency": limit,
                              "timeout_graceful_shutdown": grace}
        super().__init__(*args, **kwargs)

    async def _serve(self) -> None:
        """uvicorn_worker's ``_serve``, with a server that writes what the app held back.

        Not ``super()._serve()`` followed by a flush: when a signal stopped the server
        (gunicorn's SIGTERM on every restart and stop), uvicorn re-raises it with the
        default handler as ``serve()`` returns, and the process ends right there —
        no ``finally``, no ``atexit``, and up to ~20 ms of lease lines and request
        log lines were lost (tests/reliability/test_worker_exit_flush.py)."""
        self.config.app = self.wsgi
        server = FlushingServer(config=self.config,
                                flush=getattr(self.wsgi, "flush_held", None))
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)


class FlushingServer(Server):
    """uvicorn's server; at the end of its shutdown (connections closed, answers
    sent, still on the loop and before a captured signal is re-raised), ``flush``
    writes the lines the app held back: lease notices and releases, log lines.

    Requests still running at ``timeout_graceful_shutdown`` are cancelled by uvicorn,
    which does not wait for them to end; they are given up to ``CANCELLED_WAIT`` to
    answer their clients and release their leases (the app ends a cancelled request
    cleanly: llmuxd/proxy/fastpath.py) before the flush."""

    CANCELLED_WAIT = 1.0

    def __init__(self, config: Any, flush: Callable[[], None] | None) -> None:
        super().__init__(config=config)
        self.flush = flush

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        beat = asyncio.get_running_loop().create_task(self._heartbeat())
        try:
            await super().shutdown(sockets=sockets)
            running = [t for t in self.server_state.tasks if not t.done()]
            if running:
                await asyncio.wait(running, timeout=self.CANCELLED_WAIT)
        finally:
            beat.cancel()
            if self.flush is not None:
                self.flush()

    async def _heartbeat(self) -> None:
        """Tell gunicorn's master we are alive while our requests finish.

        uvicorn notifies it only from its main loop, which ends when the stop begins,
        and a master that watches its workers meanwhile (gunicorn before 27 after a
        reload; 27 waits for the old workers without watching) kills a worker silent
        for its ``timeout`` (60 s): a reload's old workers would be killed a minute in,
        whatever ``graceful_timeout_secs`` said."""
        notify = self.config.callback_notify
        if notify is None:
            return
        while True:
            await asyncio.sleep(self.config.timeout_notify)
            await notify()
