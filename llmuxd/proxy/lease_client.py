"""The front end's client for llmuxd: leases on the lease socket, status over HTTP.

Every proxied request costs a lease and a release, so they go over one persistent
Unix-socket connection per worker to llmuxd's lease listener
(llmuxd/control/lease_listener.py: a line protocol, no HTTP), written and read on
the worker's own event loop: no thread hop, no connect per request. Acquires are
tagged, so any number wait at once on the one connection (a switch can take
minutes) and answers may come in any order. A release is written and not waited
for (pipelined): the daemon never answers it.

Standing grants (issue 11e; protocol in lease_listener.py): the connection opens
with S, and a grant may then carry a standing epoch for its model. While the worker
holds it, ``local`` admits that model's requests here: a lease id of the worker's
own, a notice line queued like a release, and no round trip. A recall (X) drops the
epoch before anything else is read and answers K behind every notice already
queued, so the daemon has counted each admitted lease when it reads the ack; the
requests after it take the round trip again (and wait for the switch). A broken
connection drops every standing grant with it.

Lines that nobody waits for leave lazily (``LAZY_FLUSH``): the notices, and the
releases of leases whose grant still stands (no drain can be waiting for them). They
go out with the next urgent line (an acquire, a release a drain may wait for, an
ack) or after at most ``LAZY_FLUSH``, many requests' lines in one write; a request
that ended before its notice left is one ``D`` line instead of ``N`` and ``R``. At
P2's load that took most of llmuxd's CPU per request and a write per loop turn off
the worker (docs/benchmarks.md, "Fifth pass"). A recall writes every notice still
held back before its ``K``, so the ack rule is unchanged.

Leases belong to the worker's pid (SO_PEERCRED), not to the connection: a worker
that dies loses its leases in the daemon without any help from here. If the
connection breaks, waiting acquires fail with DaemonUnavailable (503) and the next
request reconnects.

Status and health are rare and go to the control socket's HTTP API
(docs/interfaces.md §5) with the same small HTTP client as the children.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from llmuxd.config import lease_socket_path
from llmuxd.lineproto import split_lines
from llmuxd.proxy.logs import lazy_delay
from llmuxd.proxy.upstream import UpstreamClient, UpstreamError

# How long a line nobody waits for may be held back to share a write with others.
LAZY_FLUSH = lazy_delay()


class DaemonUnavailable(Exception):
    """The socket could not be reached or the daemon broke the connection."""


class ClientGone(Exception):
    """The client hung up while its request waited for a lease."""


class DaemonError(Exception):
    """The daemon refused, with a code of the control API (docs/interfaces.md §5)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Lease(NamedTuple):
    """A granted lease: where to send the request and under which model name.

    A NamedTuple (immutable, built in C): one is made per request."""

    lease_id: str
    model: str
    upstream: str
    served_model_name: str
    waited_ms: float
    switched: bool
    # The standing grant it came under (local admissions, and a grant that carried
    # one): its release may leave lazily while that grant stands.
    epoch: int | None = None


class _LeaseConnection(asyncio.Protocol):
    """The one connection to the lease listener; answers resolve futures by tag.

    Lines are not written one by one: everything queued during one turn of the event
    loop (the acquires and releases of many requests at once, under load) leaves in
    one write, so the worker and llmuxd each pay one system call and one wake-up for
    the lot."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.pending: dict[bytes, asyncio.Future[Lease]] = {}
        self.answers: dict[bytes, asyncio.Future[dict[str, Any]]] = {}  # Q tags
        self.asked: dict[bytes, str] = {}         # tag → the model name it asked for
        self.lost = False
        self.buf = b""
        self.out: list[bytes] = []
        self.prefix = ""                          # from the daemon's S answer
        self.standing: dict[str, tuple[int, Lease]] = {}  # asked name → (epoch, a grant)
        self.epochs: set[int] = set()             # the epochs in ``standing``
        self.admitted = 0
        # Admitted here, N not written yet: lease id → (epoch, when, monotonic).
        self.unnoticed: dict[str, tuple[int, float]] = {}
        self.soon = False                         # a flush is due this turn of the loop
        self.later: asyncio.TimerHandle | None = None

    def local(self, model: str) -> Lease | None:
        """A lease admitted here under a standing grant for ``model``, or None."""
        held = self.standing.get(model)
        if held is None or self.lost:
            return None
        epoch, grant = held
        self.admitted += 1
        lease_id = f"{self.prefix}{self.admitted}"
        self.unnoticed[lease_id] = (epoch, time.monotonic())  # N leaves with the next flush
        self._later()
        return Lease(lease_id, grant.model, grant.upstream, grant.served_model_name,
                     0.0, False, epoch)

    def finish(self, lease: Lease, status: int, duration_ms: float,
               outcome: Callable[[float], bytes]) -> None:
        """Release ``lease``: lazily while its grant stands, else at once. ``outcome``
        renders the release's JSON with the time it ended (needed only when the lease
        was noticed)."""
        now = time.monotonic()
        held = self.unnoticed.pop(lease.lease_id, None)
        if held is not None:
            self.out.append(b"D %d %d %.3f %.6f\n" % (held[0], status, duration_ms, now))
            self._later()
            return
        line = b"R %s %s\n" % (lease.lease_id.encode(), outcome(now))
        if lease.epoch is not None and lease.epoch in self.epochs:
            self.out.append(line)
            self._later()
        else:
            self.send(line)

    def send(self, line: bytes) -> None:
        """Queue a line that someone waits for: it leaves this turn of the loop."""
        self.out.append(line)
        if not self.soon:
            self.soon = True
            self.loop.call_soon(self.flush)

    def _later(self) -> None:
        if self.later is None and not self.soon:
            self.later = self.loop.call_later(LAZY_FLUSH, self.flush)

    def _notices(self) -> None:
        """The notices held back, into the queue (before anything queued after this)."""
        if self.unnoticed:
            self.out += [_notice_line(lease_id, held)
                         for lease_id, held in self.unnoticed.items()]
            self.unnoticed.clear()

    def notice_now(self, lease_id: str) -> None:
        """Queue ``lease_id``'s notice if it is still held back (a line about that lease
        follows it)."""
        held = self.unnoticed.pop(lease_id, None)
        if held is not None:
            self.out.append(_notice_line(lease_id, held))

    def flush(self) -> None:
        self.soon = False
        if self.later is not None:
            self.later.cancel()
            self.later = None
        # The notices may follow the lines queued before them: those never refer to
        # a lease still unnoticed (its release became a D; a recall's K and a Q put
        # the notices they need ahead of themselves).
        self._notices()
        out, self.out = self.out, []
        if out and self.transport is not None and not self.lost:
            self.transport.write(b"".join(out))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; same interface.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        lines, self.buf = split_lines(self.buf + data if self.buf else data)
        for line in lines:
            self._answer(line)

    def _answer(self, line: bytes) -> None:
        if line[:2] == b"X ":
            epoch = int(line[2:])
            for name in [n for n, (e, _) in self.standing.items() if e == epoch]:
                del self.standing[name]
            self.epochs.discard(epoch)
            self._notices()
            self.send(b"K %d\n" % epoch)  # after every notice held back or queued
            return
        if line[:2] == b"= ":
            tag, _, body = line[2:].partition(b" ")
            waiter = self.answers.pop(tag, None)
            if waiter is not None and not waiter.done():
                answer = json.loads(body)
                waiter.set_result(answer if isinstance(answer, dict) else {})
            return
        if line[:2] == b"S ":
            self.prefix = line[2:].decode()
            return
        kind, tag, body = line.split(b" ", 2)
        fut = self.pending.pop(tag, None)
        asked = self.asked.pop(tag, None)
        data = json.loads(body)
        if fut is None or fut.done():
            if kind == b"+" and self.transport is not None:
                # Granted after the client left (or the wait timed out): hand it back.
                self.send(b"R %s {\"error\": \"client disconnected\"}\n"
                          % data["lease_id"].encode())
            return
        if kind == b"+":
            lease = Lease(lease_id=data["lease_id"], model=data["model"],
                          upstream=data["upstream"],
                          served_model_name=data.get("served_model_name") or data["model"],
                          waited_ms=float(data.get("waited_ms") or 0.0),
                          switched=bool(data.get("switched")))
            epoch = data.get("standing")
            if isinstance(epoch, int) and self.prefix and asked is not None:
                self.standing[asked] = (epoch, lease)
                self.epochs.add(epoch)
                lease = lease._replace(epoch=epoch)
            fut.set_result(lease)
        else:
            code = str(data.get("code") or "internal")
            fut.set_exception(DaemonError(_STATUS.get(code, 502), code,
                                          str(data.get("message") or code)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.standing.clear()
        self.epochs.clear()
        self.asked.clear()
        if self.later is not None:
            self.later.cancel()
            self.later = None
        for waiting in (self.pending, self.answers):
            for fut in waiting.values():
                if not fut.done():
                    fut.set_exception(DaemonUnavailable(
                        "the daemon closed the lease connection"))
            waiting.clear()


def _notice_line(lease_id: str, held: tuple[int, float]) -> bytes:
    """``N <epoch> <lease id> <when admitted>``."""
    return b"N %d %s %.6f\n" % (held[0], lease_id.encode(), held[1])


_STATUS = {"bad_request": 400, "model_not_found": 404, "queue_full": 429,
           "model_failed": 503, "shutting_down": 503, "timeout": 504, "internal": 500}


class LeaseClient:
    """Leases and daemon status for the event loop of one worker."""

    def __init__(self, socket_path: str, lease_timeout: float, call_timeout: float = 10.0,
                 http: UpstreamClient | None = None) -> None:
        self.socket_path = socket_path
        self.lease_path = lease_socket_path(socket_path)
        self.control = "unix:" + socket_path
        # A lease may legitimately wait for the whole request timeout (a switch).
        self.lease_timeout = lease_timeout
        self.call_timeout = call_timeout
        self.http = http or UpstreamClient(connect_timeout=call_timeout)
        self._conn: _LeaseConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future[_LeaseConnection] | None = None
        self._tags = 0

    async def _connection(self) -> _LeaseConnection:
        loop = asyncio.get_running_loop()
        conn = self._conn
        if conn is not None and not conn.lost and self._loop is loop:
            return conn
        if self._connecting is not None and self._loop is loop:
            return await asyncio.shield(self._connecting)
        self._loop = loop
        self._connecting = loop.create_future()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_unix_connection(_LeaseConnection, self.lease_path),
                self.call_timeout)
        except (OSError, TimeoutError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timeout"
            error = DaemonUnavailable(f"{self.lease_path}: {detail}")
            self._connecting.set_exception(error)
            self._connecting.exception()  # retrieved: no "never retrieved" warning
            self._connecting = None
            raise error from None
        assert isinstance(proto, _LeaseConnection)
        proto.send(b"S\n")  # standing grants welcome (answered S <prefix>, first)
        self._conn = proto
        self._connecting.set_result(proto)
        self._connecting = None
        return proto

    async def begin(self, model: str) -> tuple[bytes, asyncio.Future[Lease]]:
        """Ask for a lease on ``model``; the future resolves with it (or the refusal)."""
        conn = await self._connection()
        self._tags += 1
        tag = b"%d" % self._tags
        fut: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        conn.pending[tag] = fut
        conn.asked[tag] = model
        conn.send(b"A %s %s\n" % (tag, json.dumps(model).encode()))
        return tag, fut

    def cancel(self, tag: bytes, fut: asyncio.Future[Lease]) -> None:
        """The client left while waiting: the daemon drops the waiter (ClientGone here)."""
        if fut.done():
            return
        fut.set_exception(ClientGone("the client closed its connection while waiting"))
        conn = self._conn
        if conn is not None and not conn.lost:
            conn.send(b"C %s\n" % tag)

    async def wait(self, fut: asyncio.Future[Lease]) -> Lease:
        """The lease, or DaemonError/DaemonUnavailable/ClientGone; bounded in time."""
        loop = asyncio.get_running_loop()
        handle = loop.call_later(self.lease_timeout, _expire, fut)
        try:
            return await fut
        finally:
            handle.cancel()

    def local(self, model: str) -> Lease | None:
        """A lease on ``model`` at once under a standing grant (no round trip), or
        None: then begin/wait."""
        conn = self._conn
        # Not get_running_loop() (a getpid(2) per call): a request handler runs on
        # some loop of this thread, so the connection's loop runs iff it is that one.
        if conn is None or not conn.loop.is_running():
            return None
        return conn.local(model)

    async def acquire(self, model: str) -> Lease:
        lease = self.local(model)
        if lease is not None:
            return lease
        _, fut = await self.begin(model)
        return await self.wait(fut)

    def release(self, lease_id: str, outcome: dict[str, Any] | bytes) -> None:
        """Hand a lease back with the request's outcome (a dict, or its JSON); not
        waited for."""
        body = outcome if isinstance(outcome, bytes) else json.dumps(outcome).encode()
        line = b"R %s %s\n" % (lease_id.encode(), body)
        conn = self._conn
        if conn is not None and not conn.lost:
            conn.send(line)
            return
        # The connection broke since the lease was granted: if the daemon restarted the
        # lease is gone anyway; otherwise resend on a fresh connection.
        task = asyncio.get_running_loop().create_task(self._resend(line))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    async def _resend(self, line: bytes) -> None:
        with contextlib.suppress(DaemonUnavailable):
            conn = await self._connection()
            conn.send(line)

    def flush_now(self) -> None:
        """Write every line held back now (the worker is about to exit)."""
        conn = self._conn
        if conn is not None and not conn.lost:
            conn.flush()

    def finish(self, lease: Lease, status: int, duration_ms: float,
               outcome: Callable[[float], bytes]) -> None:
        """Hand ``lease`` back with the request's outcome (``outcome`` renders its
        JSON with the monotonic time it ended), not waited for; lazily while its
        standing grant holds (see the module's text)."""
        conn = self._conn
        if conn is not None and not conn.lost:
            conn.finish(lease, status, duration_ms, outcome)
        else:
            self.release(lease.lease_id, outcome(time.monotonic()))

    async def release_now(self, lease: Lease, outcome: dict[str, Any]) -> dict[str, Any]:
        """Hand a lease back and wait for the answer: its ``"revoked"`` says why the
        daemon took the lease back first (e.g. it killed a hung child), for the
        client's error. Only on a failed request: the fast path is ``finish``.

        On the lease connection (a ``Q`` line behind the lease's notice, so the daemon
        has always read the notice first); over the control API when that is broken."""
        body = json.dumps(outcome).encode()
        conn = self._conn
        if conn is not None and not conn.lost and conn.loop.is_running():
            conn.notice_now(lease.lease_id)
            self._tags += 1
            tag = b"%d" % self._tags
            fut: asyncio.Future[dict[str, Any]] = conn.loop.create_future()
            conn.answers[tag] = fut
            conn.send(b"Q %s %s %s\n" % (tag, lease.lease_id.encode(), body))
            try:
                return await asyncio.wait_for(fut, self.call_timeout)
            except TimeoutError:
                conn.answers.pop(tag, None)
                raise DaemonUnavailable("no answer to the release in time") from None
        lease_id = lease.lease_id
        data = await self._get(f"/v1/leases/{lease_id}/release", "POST", body)
        return data if isinstance(data, dict) else {}

    async def _get(self, path: str, method: str = "GET", body: bytes | None = None) -> Any:
        try:
            status, raw = await self.http.call(self.control, method, path, body,
                                               self.call_timeout)
        except UpstreamError as exc:
            raise DaemonUnavailable(f"{self.socket_path}: {exc}") from None
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            raise DaemonUnavailable("daemon answered with invalid JSON") from None
        if status >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            if isinstance(err, dict):
                raise DaemonError(status, str(err.get("code") or "internal"),
                                  str(err.get("message") or f"daemon answered {status}"))
            raise DaemonError(status, "internal", f"daemon answered {status}")
        return data

    async def status(self) -> dict[str, Any]:
        data: dict[str, Any] = await self._get("/v1/status")
        return data

    async def health(self) -> dict[str, Any]:
        data: dict[str, Any] = await self._get("/v1/health")
        return data

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.transport.close()
        self.http.close()


class StatusCache:
    """The daemon's status, at most ``max_age`` seconds old, one fetch at a time.

    For the readiness route: a load balancer polling every model every second must
    not cost a round trip to llmuxd per check."""

    def __init__(self, client: LeaseClient, max_age: float = 1.0) -> None:
        self.client = client
        self.max_age = max_age
        self._value: dict[str, Any] | None = None
        self._at = 0.0
        self._fetching: asyncio.Future[dict[str, Any]] | None = None

    async def get(self) -> dict[str, Any]:
        if self._value is not None and time.monotonic() - self._at < self.max_age:
            return self._value
        if self._fetching is not None and self._fetching.get_loop() is \
                asyncio.get_running_loop():
            return await asyncio.shield(self._fetching)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._fetching = fut
        try:
            value = await self.client.status()
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()
            raise
        finally:
            self._fetching = None
        self._value, self._at = value, time.monotonic()
        fut.set_result(value)
        return value


_BACKGROUND: set[asyncio.Task[None]] = set()


def _expire(fut: asyncio.Future[Lease]) -> None:
    if not fut.done():
        fut.set_exception(DaemonUnavailable("no answer to the lease request in time"))
