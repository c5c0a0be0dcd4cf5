"""The lease round trip on its own Unix socket: a line protocol on one event-loop thread.

Why not the control API's HTTP routes: every proxied request costs one lease and one
release, and over HTTP each costs llmuxd a thread wake-up, a request parse, routing
and JSON both ways (~150-200 µs of the daemon's CPU per request, measured in
docs/benchmarks.md). Here one thread runs an asyncio loop for all front-end
connections; a line is split, not parsed as HTTP, and a lease that can be granted at
once (the model is ACTIVE: the common case) is granted on the loop through the
lease table's non-blocking fast path (``LeaseTable.try_acquire``). Only a request
that must wait for a switch gets a thread of its own, which blocks in
``LeaseTable.acquire`` exactly as the HTTP route does and posts the answer back.

The protocol (UTF-8 lines; the front end's client is llmuxd/proxy/lease_client.py):

    front end → llmuxd
      S                              "I take standing grants"; answered S <prefix>
      A <tag> <json model name>      acquire; answered with + or - and the same tag
      C <tag>                        the client left: drop this waiting acquire
      R <lease id> <json outcome>    release; never answered (pipelined)
      Q <tag> <lease id> <json outcome>
                                     release and say whether the lease was revoked
                                     first (a failed request's error names why);
                                     answered = <tag> {"released": true, "revoked": ..}
      N <epoch> <lease id> [<at>]    notice: admitted a lease under a standing grant
                                     (never answered; the id starts with <prefix>)
      D <epoch> <status> <duration ms> [<at>]
                                     done: a request admitted under <epoch> ended
                                     before its notice left (N and R in one line)
      (<at>: when it happened, in seconds of CLOCK_MONOTONIC, which both ends share;
      R's outcome may carry it as "ended_at". Lines sent late keep the model's idle
      time true.)
      K <epoch>                      ack: no more admissions under <epoch>
    llmuxd → front end
      S <prefix>                     the lease id prefix of this connection's notices
      + <tag> <json grant>           {"lease_id", "model", "upstream",
                                      "served_model_name", "waited_ms", "switched"}
                                     and, after S, maybe "standing": <epoch>
      - <tag> <json error>           {"code", "message"} (docs/interfaces.md §5 codes)
      = <tag> <json>                 the answer to Q
      X <epoch>                      recall: stop admitting under <epoch>, then K

Standing grants (issue 11e) take the round trip off an ACTIVE model's requests: a
fast grant on a model whose gate is open with nothing pending against it carries an
epoch, and while the worker holds it, it admits that model's requests itself (a
lease id of its own, a notice line, and the request goes upstream at once). The
daemon records each notice as a lease exactly like a granted one (llmuxd/leases.py).
Whatever closes the gate recalls the epoch, and the gate does not count as drained
until the worker's K is read: the worker writes K after it stopped admitting, on the
same stream as its notices, so every lease it admitted is counted by then. A closed
connection counts as acked; a worker that never acks is cut by the drain timeout.
Notices, and the releases of leases whose grant still stands, are not urgent (nobody
waits for them), so the worker sends them up to ~20 ms late, many per write, and a
request that ended by then as one D line; a recall makes it write every notice it
held back before its K.

Leases belong to the peer pid (SO_PEERCRED), as on the control socket: when a
connection closes and its process is dead (a killed worker), its leases are
reclaimed at once. The HTTP lease routes stay for llmuxctl and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

from llmuxd.config import lease_socket_path
from llmuxd.control.errors import ApiError
from llmuxd.leases import Lease
from llmuxd.lineproto import split_lines

log = structlog.get_logger("llmuxd.leases")

MAX_LINE = 65536


class LeaseBackend(Protocol):
    """What the listener asks of the daemon (SupervisorBackend) or of a test stand-in."""

    def try_acquire(self, model: str, pid: int) -> dict[str, Any] | None:
        """A grant now, None to wait (then acquire() on a thread), or raise ApiError."""

    def acquire(self, model: str, pid: int, cancelled: Callable[[], bool]) -> dict[str, Any]:
        """Block until granted; raise ApiError when refused, timed out or cancelled."""

    def release(self, lease_id: str, outcome: dict[str, Any]) -> None:
        """End a lease with the request's outcome (unknown ids are ignored)."""

    def release_answer(self, lease_id: str, outcome: dict[str, Any]) -> dict[str, Any]:
        """Release, answering {"released": true} and, when the lease had been revoked
        first, {"revoked": why} (the control API's release route)."""

    def peer_gone(self, pid: int) -> None:
        """A connection of ``pid`` closed: reclaim its leases if it is dead."""

    # Optional (a backend without them never gives standing grants):
    # standing(model, holder) -> int | None, notice(epoch, lease_id, pid),
    # done(epoch, status, duration_ms), ack(epoch), holder_gone(holder);
    # see SupervisorBackend.


class SupervisorBackend:
    """The real daemon: name resolution, the lease table's fast path, metrics."""

    def __init__(self, sup: Any) -> None:
        self.sup = sup

    def _grant(self, name: str, lease: Any) -> dict[str, Any]:
        self.sup.metrics.granted(name, lease.waited_s)
        upstream, served = self.sup.leases.upstream(name)
        return {"lease_id": lease.lease_id, "model": name, "upstream": upstream,
                "served_model_name": served, "waited_ms": round(lease.waited_s * 1000, 3),
                "switched": lease.switched}

    def try_acquire(self, model: str, pid: int) -> dict[str, Any] | None:
        name = self.sup.resolve(model)
        try:
            lease = self.sup.leases.try_acquire(name, pid)
        except ApiError as exc:
            self.sup.metrics.refused(name, exc.code)
            raise
        return None if lease is None else self._grant(name, lease)

    def acquire(self, model: str, pid: int, cancelled: Callable[[], bool]) -> dict[str, Any]:
        name = self.sup.resolve(model)
        try:
            lease = self.sup.leases.acquire(name, pid,
                                            self.sup.config.policy.request_timeout_secs,
                                            cancelled=cancelled)
        except ApiError as exc:
            self.sup.metrics.refused(name, exc.code)
            raise
        return self._grant(name, lease)

    def release(self, lease_id: str, outcome: dict[str, Any]) -> None:
        self._end(lease_id, outcome)

    def release_answer(self, lease_id: str, outcome: dict[str, Any]) -> dict[str, Any]:
        """Release, and why the lease was revoked first ("" if it was not): the
        control API's release route, on the lease socket (ordered after the notice)."""
        if self._end(lease_id, outcome) is not None:
            return {"released": True}
        return {"released": True, "revoked": self.sup.leases.revoked_reason(lease_id) or ""}

    def _end(self, lease_id: str, outcome: dict[str, Any]) -> Lease | None:
        """The ended lease (counted in the metrics), or None: unknown or revoked first."""
        try:
            lease = self.sup.leases.release(lease_id, _at(outcome.get("ended_at")))
        except ApiError:
            return None  # unknown lease: nothing to do
        if lease is not None:
            self.sup.metrics.released(lease.model, outcome.get("status"),
                                      outcome.get("duration_ms"))
        return lease

    def done(self, epoch: int, status: int, duration_ms: float,
             at: float | None = None) -> None:
        model = self.sup.leases.done(epoch, at)
        if model is not None:
            self.sup.metrics.granted(model, 0.0)
            self.sup.metrics.released(model, status, duration_ms)

    def standing(self, model: str, holder: Any) -> int | None:
        """A standing grant for ``holder`` on ``model`` (a resolved name), or None."""
        epoch: int | None = self.sup.leases.standing_for(model, holder)
        return epoch

    def notice(self, epoch: int, lease_id: str, pid: int, at: float | None = None) -> None:
        lease = self.sup.leases.notice(epoch, lease_id, pid, at)
        if lease is not None:
            self.sup.metrics.granted(lease.model, 0.0)

    def ack(self, epoch: int) -> None:
        self.sup.leases.ack(epoch)

    def holder_gone(self, holder: Any) -> None:
        self.sup.leases.holder_gone(holder)

    def peer_gone(self, pid: int) -> None:
        from llmuxd.pidcheck import pid_alive
        if pid != os.getpid() and not pid_alive(pid):
            self.sup.reclaim_pid(pid)


def _at(value: Any) -> float | None:
    """A timestamp from a line (a number), or None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bytes):
        with contextlib.suppress(ValueError):
            return float(value)
    return None


def _peer(sock: socket.socket) -> tuple[int, int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


_SERIALS = itertools.count(1)


class _Connection(asyncio.Protocol):
    """One front-end worker's connection: lines in, answers out, on the loop thread.

    It is also the lease table's Holder of the standing grants it was given."""

    def __init__(self, listener: LeaseListener) -> None:
        self.listener = listener
        self.backend = listener.backend
        self.loop = listener.loop
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.pid = 0
        self.closed = False
        self.cancelled: set[str] = set()
        self.out: list[bytes] = []
        # Standing grants: only for a peer that said S (it understands X and sends N/K).
        self.standing_ok = False
        self.prefix = f"{os.getpid():x}-s{next(_SERIALS)}-"
        self._standing = getattr(self.backend, "standing", None)

    def recall(self, epoch: int) -> None:
        """The lease table recalls ``epoch`` (any thread): write X on the loop."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: daemon stopping
            self.loop.call_soon_threadsafe(self._send, b"X %d\n" % epoch)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; same interface.
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        pid, uid, gid = _peer(sock)
        if not self.listener.allowed(uid, gid, pid):
            log.warning("lease_peer_refused", pid=pid, uid=uid)
            transport.close()
            return
        self.pid = pid
        self.listener.connections.add(self)

    def data_received(self, data: bytes) -> None:
        lines, self.buf = split_lines(self.buf + data if self.buf else data)
        for line in lines:
            self._line(line)
        if len(self.buf) > MAX_LINE and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.connections.discard(self)
        if self.standing_ok:
            # Every notice it sent was read before this: a closed holder has acked.
            self.backend.holder_gone(self)  # type: ignore[attr-defined]
        if self.pid:
            self.backend.peer_gone(self.pid)
            # A dying process closes its sockets before it is a zombie, so "is it dead"
            # can still say no right now: look again shortly (the supervisor's periodic
            # sweep is the backstop).
            for delay in (0.2, 2.0):
                self.loop.call_later(delay, self.backend.peer_gone, self.pid)

    def _line(self, line: bytes) -> None:
        op, _, rest = line.partition(b" ")
        if op == b"N":
            epoch, _, rest = rest.partition(b" ")
            lease_id, _, at = rest.partition(b" ")
            lid = lease_id.decode()
            if self.standing_ok and lid.startswith(self.prefix) and epoch.isdigit():
                self.backend.notice(  # type: ignore[attr-defined]
                    int(epoch), lid, self.pid, _at(at))
            else:
                log.warning("lease_notice_refused", pid=self.pid, lease_id=lid[:80])
        elif op == b"D":
            parts = rest.split(b" ")
            try:
                epoch_n, status, duration = int(parts[0]), int(parts[1]), float(parts[2])
            except (ValueError, IndexError):
                log.warning("lease_done_refused", pid=self.pid,
                            line=line[:80].decode("utf-8", "replace"))
                return
            if self.standing_ok:
                self.backend.done(  # type: ignore[attr-defined]
                    epoch_n, status, duration, _at(parts[3]) if len(parts) > 3 else None)
        elif op == b"Q":
            tag, _, rest = rest.partition(b" ")
            lease_id, _, body = rest.partition(b" ")
            try:
                outcome = json.loads(body) if body else {}
            except ValueError:
                outcome = {}
            answer = self.backend.release_answer(
                lease_id.decode(), outcome if isinstance(outcome, dict) else {})
            self._send(b"= %s %s\n" % (tag, json.dumps(answer).encode()))
        elif op == b"R":
            lease_id, _, body = rest.partition(b" ")
            try:
                outcome = json.loads(body) if body else {}
            except ValueError:
                outcome = {}
            self.backend.release(lease_id.decode(), outcome if isinstance(outcome, dict)
                                 else {})
        elif op == b"A":
            tag, _, body = rest.partition(b" ")
            self._acquire(tag.decode(), body)
        elif op == b"C":
            self.cancelled.add(rest.decode())
        elif op == b"K":
            if self.standing_ok and rest.isdigit():
                self.backend.ack(int(rest))  # type: ignore[attr-defined]
        elif op == b"S" and self._standing is not None and not self.standing_ok:
            self.standing_ok = True
            self._send(b"S %s\n" % self.prefix.encode())

    def _acquire(self, tag: str, body: bytes) -> None:
        try:
            model = json.loads(body)
            if not isinstance(model, str) or not model:
                raise ApiError("bad_request", "the model must be a non-empty string")
            grant = self.backend.try_acquire(model, self.pid)
        except ApiError as exc:
            self._answer(tag, None, exc)
            return
        except ValueError:
            self._answer(tag, None, ApiError("bad_request", "malformed lease request"))
            return
        if grant is not None:
            if self.standing_ok:
                assert self._standing is not None
                epoch = self._standing(grant["model"], self)
                if epoch is not None:
                    grant["standing"] = epoch
            self._answer(tag, grant, None)
            return
        threading.Thread(target=self._wait, args=(tag, model), name="lease-wait",
                         daemon=True).start()

    def _wait(self, tag: str, model: str) -> None:
        """On its own thread: block until the switch grants or refuses the lease."""
        def cancelled() -> bool:
            return self.closed or tag in self.cancelled

        grant: dict[str, Any] | None = None
        error: ApiError | None = None
        try:
            grant = self.backend.acquire(model, self.pid, cancelled)
        except ApiError as exc:
            error = exc
        except Exception as exc:  # a bug must not leave the request waiting forever
            log.exception("lease_wait_failed", model=model)
            error = ApiError("internal", f"lease failed: {type(exc).__name__}")
        with contextlib.suppress(RuntimeError):  # the loop is gone: daemon stopping
            self.loop.call_soon_threadsafe(self._answer, tag, grant, error)

    def _answer(self, tag: str, grant: dict[str, Any] | None, error: ApiError | None) -> None:
        self.cancelled.discard(tag)
        transport = self.transport
        if transport is None or transport.is_closing():
            if grant is not None:  # nobody will use it: hand it straight back
                self.backend.release(grant["lease_id"], {"error": "front end went away"})
            return
        if grant is not None:
            line = b"+ %s %s\n" % (tag.encode(), json.dumps(grant).encode())
        else:
            assert error is not None
            line = b"- %s %s\n" % (tag.encode(), json.dumps(
                {"code": error.code, "message": error.message}).encode())
        self._send(line)

    def _send(self, line: bytes) -> None:
        """Queue a line; the lines of one turn of the loop leave in one write (one
        wake-up of the worker)."""
        if not self.out:
            self.loop.call_soon(self._flush)
        self.out.append(line)

    def _flush(self) -> None:
        out, self.out = self.out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))


class LeaseListener:
    """The lease socket and the one thread whose event loop serves it."""

    def __init__(self, path: str, backend: LeaseBackend, mode: int = 0o660,
                 allowed: Callable[[int, int, int], bool] | None = None, gid: int = -1
                 ) -> None:
        self.path = path
        self.backend = backend
        self.mode = mode
        self.gid = gid
        self.allowed = allowed or (lambda uid, gid, pid: True)
        self.loop = _new_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None
        self.connections: set[_Connection] = set()

    def start(self) -> LeaseListener:
        """Bind (replacing a stale socket file) and serve on a new thread."""
        path = Path(self.path)
        if path.is_symlink() or path.exists():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise OSError(f"{path} exists and is not a socket")
            path.unlink()  # the control socket's bind already proved no daemon owns it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        if self.gid >= 0:
            os.chown(path, -1, self.gid)
        os.chmod(path, self.mode)
        sock.listen(1024)
        sock.setblocking(False)
        self._sock = sock
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def serve() -> None:
                self._server = await self.loop.create_unix_server(
                    lambda: _Connection(self), sock=sock)
                ready.set()

            self.loop.run_until_complete(serve())
            self.loop.run_forever()
            self.loop.close()

        self._thread = threading.Thread(target=run, name="lease-listener", daemon=True)
        self._thread.start()
        if not ready.wait(10.0):
            raise OSError("the lease listener did not start")
        return self

    def close(self) -> None:
        """Stop serving, drop every connection, remove the socket file."""
        thread, self._thread = self._thread, None
        if thread is None:
            return

        def stop() -> None:
            if self._server is not None:
                self._server.close()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.abort()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.stop()

        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(stop)
        thread.join(10.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (the front end's dependency): less CPU per line."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def start_for(sup: Any, control_socket: str, mode: int,
              allowed: Callable[[int, int, int], bool], gid: int = -1) -> LeaseListener:
    """The daemon's hook: serve leases next to ``control_socket`` for ``sup``, with the
    control socket's mode, group and peer check."""
    listener = LeaseListener(lease_socket_path(control_socket), SupervisorBackend(sup), mode,
                             allowed, gid)
    return listener.start()
