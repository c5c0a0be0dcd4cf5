"""The front end's HTTP/1.1 client to the children (and to llmuxd's control socket).

Why a small client of our own on an ``asyncio.Protocol`` with httptools' parser,
rather than aiohttp's client: per request it is one ``write`` of head and body, one
C parse of what comes back, and a body handed over as the bytes of each read — no
per-request session, no header multidict, no stream-reader copies. Measured in one
run against aiohttp's client (docs/benchmarks.md, "upstream client"); it talks only
to peers llmux starts itself, so it needs no TLS, proxies or redirects.

* Transport from the lease: ``http://HOST:PORT`` (TCP) or ``unix:/ABS/PATH.sock``
  (a child on a Unix socket); one pool of kept-alive connections per upstream.
* Timeouts: a wait for the next byte of the answer (head or body) longer than
  ``idle`` raises UpstreamIdle; the whole exchange past ``deadline`` raises
  UpstreamDeadline. Both abort the connection, so the child sees the request end.
* Backpressure: when the client reads slower than the child writes, at most
  ``HIGH_WATER`` bytes wait here, then reading from the child pauses.
* ``abort()`` from any callback (the client left) ends a pending read at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httptools

HIGH_WATER = 1 << 20
LOW_WATER = 256 << 10
MAX_IDLE_PER_UPSTREAM = 256


class UpstreamError(Exception):
    """The child could not be reached, or broke off the answer."""


class UpstreamIdle(UpstreamError):
    """No byte from the child for the idle timeout."""


class UpstreamDeadline(UpstreamError):
    """The exchange took longer than its total timeout."""


class Aborted(UpstreamError):
    """We ended the exchange ourselves (the client left)."""


class PeerClosed(UpstreamError):
    """The connection closed before any byte of the answer (safe to retry once)."""


def parse_upstream(upstream: str) -> tuple[str, str, int]:
    """``http://h:p`` → ("tcp", h, p); ``unix:/path`` → ("unix", "/path", 0)."""
    if upstream.startswith("unix:"):
        path = upstream[5:]
        if path.startswith("//"):  # unix:///abs/path
            path = path[2:]
        if not path.startswith("/"):
            raise ValueError(f"unix upstream must be an absolute path: {upstream!r}")
        return "unix", path, 0
    rest = upstream.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    return "tcp", host.strip("[]") or "127.0.0.1", int(port)


class Connection(asyncio.Protocol):
    """One kept-alive connection; one exchange at a time."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.timer: asyncio.TimerHandle | None = None
        self.last_data = 0.0
        self.idle = 0.0
        self.deadline = 0.0
        self.armed = (0.0, 0.0)  # the (idle, deadline) the running timer was set for
        self.parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        # The parser is kept: a kept-alive connection is reused only after its last
        # answer was parsed to its end, where the parser is ready for the next one.
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.done = False
        self.got_bytes = False
        self.keep_alive = False
        self.framed = False  # Content-Length or chunked: the end is in the data
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.sink: Callable[[bytes], None] | None = None
        self.pushed: list[bytes] = []

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; same interface.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.last_data = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the child switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed answer from the child: {exc}"))
        pushed = self.pushed
        if pushed and self.sink is not None:
            self.sink(pushed[0] if len(pushed) == 1 else b"".join(pushed))
            pushed.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.head_done and not self.done and not self.framed:
            self.done = True  # a body delimited by the close of the connection
        elif not self.done and self.error is None:
            if not self.got_bytes:
                self.error = PeerClosed("the child closed the connection without answering")
            else:
                self.error = UpstreamError("the child closed the connection mid-answer")
        self._wake()

    def pause_writing(self) -> None:  # pragma: no cover - requests are small
        pass

    def resume_writing(self) -> None:  # pragma: no cover
        pass

    # -- httptools callbacks -------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length" or (lower == b"transfer-encoding"
                                          and b"chunked" in value.lower()):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            # Pushed at the end of this data_received, with the other pieces of the
            # same read: no wake-up of the relaying task, one write for the lot.
            self.pushed.append(body)
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.done = True
        self._wake()

    # -- the exchange --------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def abort(self, exc: BaseException | None = None) -> None:
        """End the exchange now (any callback may call it): the pending wait raises."""
        self._fail(exc or Aborted("aborted"))

    async def _wait(self, idle: float, deadline: float) -> None:
        """Wait for the parser's next event, within the idle and total timeouts.

        One timer per connection, not one per wait (nor per exchange: it outlives a
        return to the pool): a stream waits once per chunk, and arming a timer each
        time was a measurable share of the per-chunk CPU. Arrivals (and each new
        exchange: ``UpstreamClient.send``) only stamp ``last_data``; a timer that fires
        early re-arms itself, and one set for a later deadline or a longer idle time
        than this wait's is replaced."""
        self.idle = idle
        self.deadline = deadline
        waiter = self.loop.create_future()
        self.waiter = waiter
        timer = self.timer
        if timer is None:
            self._arm()
        elif idle < self.armed[0] or deadline < self.armed[1]:
            timer.cancel()
            self._arm()
        try:
            await waiter
        finally:
            self.waiter = None

    def _arm(self) -> None:
        due = min(self.last_data + self.idle,
                  self.loop.time() + (self.deadline - time.monotonic()))
        self.timer = self.loop.call_at(due, self._check)
        self.armed = (self.idle, self.deadline)

    def _check(self) -> None:
        self.timer = None
        if self.waiter is None or self.waiter.done():
            return  # nobody waits: the next wait arms it again
        now = self.loop.time()
        if time.monotonic() >= self.deadline:
            self._fail(UpstreamDeadline("the child's answer took longer than the total "
                                        "timeout"))
        elif now - self.last_data >= self.idle:
            self._fail(UpstreamIdle("no byte from the child within the idle timeout"))
        else:
            self._arm()

    async def head(self, idle: float, deadline: float) -> None:
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait(idle, deadline)

    async def read(self, idle: float, deadline: float) -> bytes:
        """What the child sent of the body since the last read (b"" at its end).

        Pieces that arrived together (the reader fell behind: a busy loop, a slow
        client) are returned as one, so they cost one send to the client, not one
        each; a reader that keeps up gets each piece as it comes."""
        chunks = self.chunks
        while not chunks:
            if self.error is not None:
                raise self.error
            if self.done:
                return b""
            await self._wait(idle, deadline)
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join(_drain(chunks))
        self.buffered -= len(chunk)
        if self.paused and self.buffered < LOW_WATER and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    def push_to(self, sink: Callable[[bytes], None]) -> None:
        """From now on hand each body piece to ``sink`` as it arrives (what is already
        here first), instead of queueing it for ``read``. ``sink`` may call
        ``pause_for_reader``; the task relaying waits in ``wait_pushed``."""
        if self.chunks:
            pieces = b"".join(_drain(self.chunks))
            self.buffered = 0
            sink(pieces)
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        self.sink = sink

    def pause_for_reader(self) -> None:
        """The client cannot take more for now: stop reading from the child and wake
        the relaying task (it waits for the client, then calls ``resume_for_reader``)."""
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def resume_for_reader(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    async def wait_pushed(self, idle: float, deadline: float) -> None:
        """In push mode: return when the answer ended or the sink paused; raise when it
        failed (idle and total timeouts as for ``read``)."""
        if self.error is None and not self.done and not self.paused:
            await self._wait(idle, deadline)
        if self.error is not None:
            raise self.error

    @property
    def reusable(self) -> bool:
        return (self.done and self.keep_alive and self.error is None and not self.lost
                and not self.chunks)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.lost = True
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class UpstreamClient:
    """Kept-alive connections per upstream, for the event loop of one worker."""

    def __init__(self, connect_timeout: float = 10.0) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[str, list[Connection]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _connect(self, upstream: str) -> Connection:
        kind, where, port = parse_upstream(upstream)
        loop = asyncio.get_running_loop()
        try:
            # asyncio.timeout, not wait_for: no task of its own per connect (a burst of
            # new streams opens hundreds at once).
            async with asyncio.timeout(self.connect_timeout):
                if kind == "unix":
                    _, conn = await loop.create_unix_connection(
                        lambda: Connection(upstream), where)
                else:
                    _, conn = await loop.create_connection(
                        lambda: Connection(upstream), where, port)
        except ConnectionRefusedError:
            raise UpstreamError(f"connection refused by {describe(upstream)}") from None
        except FileNotFoundError:
            raise UpstreamError(f"no socket at {describe(upstream)}") from None
        except TimeoutError:
            raise UpstreamError(f"no connection to {describe(upstream)} in time") from None
        except OSError as exc:
            raise UpstreamError(f"{describe(upstream)}: {exc.strerror or exc}") from None
        assert isinstance(conn, Connection)
        return conn

    def _take(self, upstream: str) -> Connection | None:
        # A new loop (tests): the old one's connections are unusable. Not asked of
        # get_running_loop() per request (a getpid(2) each): the caller runs on a loop
        # of this thread, so the pool's loop runs iff it is that one.
        if self._loop is None or not self._loop.is_running():
            self._idle.clear()
            self._loop = asyncio.get_running_loop()
        idle = self._idle.get(upstream)
        while idle:
            conn = idle.pop()
            if not conn.lost:
                conn._reset()
                return conn
        return None

    def give_back(self, conn: Connection) -> None:
        """Keep a connection whose last answer was read to its end; close it otherwise."""
        if not conn.reusable:
            conn.close()
            return
        # Its timer keeps running: it stops itself when it finds nobody waiting, and
        # the next exchange on this connection (usually sooner) needs no new one.
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= MAX_IDLE_PER_UPSTREAM:
            conn.close()
            return
        idle.append(conn)

    async def send(self, upstream: str, request: bytes, idle: float, deadline: float,
                   client: Any = None) -> Connection:
        """Send ``request`` (head and body) and wait for the answer's head.

        ``client`` (the worker's connection object, if any): should it close while we
        wait (a non-streaming answer's head comes only at its end), the request is
        aborted at once (Aborted), so the child stops generating for nobody."""
        for attempt in (0, 1):
            conn = self._take(upstream)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(upstream)
            assert conn.transport is not None
            conn.transport.write(request)
            conn.last_data = conn.loop.time()  # the idle clock starts with the request
            gone = None
            if client is not None:
                def gone(conn: Connection = conn) -> None:
                    conn.abort(Aborted("client disconnected"))
                client.on_lost(gone)
                if client.transport is None or client.transport.is_closing():
                    gone()
            try:
                await conn.head(idle, deadline)
            except PeerClosed:
                conn.close()
                if reused and attempt == 0:
                    continue  # the child closed a kept-alive connection while idle
                raise UpstreamError(f"{describe(upstream)} closed the connection "
                                    "without answering") from None
            except BaseException:
                conn.close()
                raise
            finally:
                if gone is not None:
                    client.remove_on_lost(gone)
            return conn
        raise AssertionError("unreachable")

    async def get(self, upstream: str, path: str, timeout: float,
                  host: str = "llmuxd") -> tuple[int, bytes]:
        """A small GET (llmuxd's status and health): (status, whole body)."""
        return await self.call(upstream, "GET", path, None, timeout, host)

    async def call(self, upstream: str, method: str, path: str, body: bytes | None,
                   timeout: float, host: str = "llmuxd") -> tuple[int, bytes]:
        """A small request with a JSON body or none: (status, whole answer body)."""
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        request = (head + "\r\n").encode() + (body or b"")
        deadline = time.monotonic() + timeout
        conn = await self.send(upstream, request, timeout, deadline)
        answer = bytearray()
        try:
            while chunk := await conn.read(timeout, deadline):
                answer += chunk
        except BaseException:
            conn.close()
            raise
        self.give_back(conn)
        return conn.status, bytes(answer)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _drain(chunks: deque[bytes]) -> list[bytes]:
    out = list(chunks)
    chunks.clear()
    return out


def describe(upstream: str) -> str:
    """``127.0.0.1:8001`` or ``/run/llmux/m.sock``, for messages."""
    with contextlib.suppress(ValueError):
        kind, where, port = parse_upstream(upstream)
        return where if kind == "unix" else f"{where}:{port}"
    return upstream
