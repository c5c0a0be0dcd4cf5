"""The control API server: HTTP/1.1 + JSON over an AF_UNIX stream socket.

Why a small hand-written HTTP layer instead of http.server: the lease round trip
runs on every proxied request, and BaseHTTPRequestHandler's email-based header
parsing costs more CPU than the whole lease logic. Requests here are tiny and
come from our own clients, so a strict minimal parser (request line, headers,
Content-Length body, keep-alive) is enough. One thread per connection: front-end
workers keep their connections open, and a waiting lease blocks only its own.
The threads are bounded (connlimits.ConnectionGate: ``daemon.max_connections``,
a 503 beyond it), an idle connection is closed after ``daemon.idle_timeout_secs``
and a request must arrive whole within ``daemon.read_timeout_secs`` once begun.

Each connection records its peer's credentials (SO_PEERCRED) once; the pid owns
the leases taken on it, and the uid/gid decide whether mutating routes are allowed.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import select
import socket
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import structlog

from llmuxd.config import DaemonConfig
from llmuxd.connlimits import BadContentLength, ConnectionGate, content_length, refuse
from llmuxd.control.commands import Request, dispatch

log = structlog.get_logger("llmuxd.control")

MAX_LINE = 8192
MAX_HEADERS = 100
MAX_BODY = 1 << 20
REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           413: "Payload Too Large", 429: "Too Many Requests",
           500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout"}


class ControlSocketError(RuntimeError):
    """The control socket cannot be set up (path in use, group unknown...)."""


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    def groups(self) -> set[int]:
        """The peer's supplementary groups (from /proc; empty when unreadable)."""
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        return {int(g) for g in line.split()[1:]}
        except (OSError, ValueError):
            pass
        return set()


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


class _BadRequest(Exception):
    pass


class ControlServer:
    """Listens on ``daemon.socket``; hands every request to commands.dispatch."""

    def __init__(self, sup: Any, daemon: DaemonConfig) -> None:
        self.sup = sup
        self.path = daemon.socket
        self.mode = daemon.socket_mode
        self.group_name = daemon.socket_group
        self.allowed_gid = os.getgid()
        self.uid = os.getuid()
        self._listener: socket.socket | None = None
        self._closing = False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.idle_timeout = daemon.idle_timeout_secs
        self.read_timeout = daemon.read_timeout_secs
        self._gate = ConnectionGate(daemon.max_connections, "control")

    # -- setup ----------------------------------------------------------------

    def start(self) -> None:
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ControlSocketError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(str(path))
            except OSError:
                path.unlink()            # stale socket of a dead daemon
            else:
                raise ControlSocketError(f"another llmuxd is listening on {path}")
            finally:
                probe.close()
        if self.group_name:
            try:
                self.allowed_gid = grp.getgrnam(self.group_name).gr_gid
            except KeyError:
                raise ControlSocketError(
                    f"daemon.socket_group: unknown group '{self.group_name}'") from None
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)      # never world-accessible, even for an instant
        try:
            lst.bind(str(path))
        except OSError as exc:
            lst.close()
            raise ControlSocketError(f"cannot bind {path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old_umask)
        try:
            if self.group_name:
                os.chown(path, -1, self.allowed_gid)
            os.chmod(path, self.mode)
        except OSError as exc:
            lst.close()
            raise ControlSocketError(f"cannot set mode/group of {path}: "
                                     f"{exc.strerror or exc}") from None
        lst.listen(256)
        self._listener = lst
        threading.Thread(target=self._accept_loop, name="control-accept", daemon=True).start()
        # The front end's lease round trip (issue 11): its own socket and event loop.
        from llmuxd.control import lease_listener
        self.lease_listener = lease_listener.start_for(
            self.sup, self.path, self.mode, lambda uid, gid, pid: self.may_mutate(
                Peer(pid, uid, gid)), self.allowed_gid if self.group_name else -1)

    def close(self) -> None:
        self._closing = True
        if getattr(self, "lease_listener", None) is not None:
            self.lease_listener.close()
        self._gate.close()
        lst, self._listener = self._listener, None
        if lst is None:
            return          # never listened: the path may be another daemon's socket
        with contextlib.suppress(OSError):
            lst.shutdown(socket.SHUT_RDWR)
        lst.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    # -- permission -----------------------------------------------------------

    def may_mutate(self, peer: Peer) -> bool:
        if peer.uid in (0, self.uid) or peer.gid == self.allowed_gid:
            return True
        return self.allowed_gid in peer.groups()

    # -- connections ----------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closing:
            lst = self._listener
            if lst is None:
                return
            try:
                conn, _ = lst.accept()
            except OSError:
                if self._closing:
                    return
                continue
            if self._gate.admit(conn, self._serve) == "full":
                log.warning("control_connection_refused", reason="too many connections",
                            max_connections=self._gate.cap)
                refuse(conn, _response(503, {"error": {
                    "code": "too_many_connections",
                    "message": f"llmuxd serves at most {self._gate.cap} control "
                               "connections at once (daemon.max_connections); "
                               "retry later"}}, close=True))

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._serve_conn(conn)
        finally:
            self._gate.leave()

    def _serve_conn(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)
        peer: Peer | None = None
        try:
            peer = peer_of(conn)
            rfile = conn.makefile("rb")

            def cancelled() -> bool:
                return _peer_closed(conn)

            while not self._closing:
                try:
                    req = self._read_request(conn, rfile, peer, cancelled)
                except _BadRequest as exc:
                    self._send(conn, 400, {"error": {"code": "bad_request",
                                                     "message": str(exc)}}, close=True)
                    return
                if req is None:
                    return
                status, body = dispatch(self.sup, req, self.may_mutate(peer))
                keep = req.keep_alive and not self._closing
                self._send(conn, status, body, close=not keep)
                if not keep:
                    return
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()
            if peer is not None and not self._closing:
                self._after_close(peer.pid)

    def _after_close(self, pid: int) -> None:
        """A client hung up: if it is dead (a killed worker), reclaim its leases now."""
        from llmuxd.pidcheck import pid_alive
        if pid != os.getpid() and not pid_alive(pid):
            self.sup.reclaim_pid(pid)

    def _read_request(self, conn: socket.socket, rfile: Any, peer: Peer, cancelled: Any
                      ) -> Request | None:
        """The next request, or None at EOF, idle timeout or a request cut short.

        Waiting for a request's first line is bounded by the idle timeout; once it
        has begun, headers and body must follow within the read timeout.
        """
        conn.settimeout(self.idle_timeout)
        try:
            line = rfile.readline(MAX_LINE + 1)
            while line in (b"\r\n", b"\n"):
                line = rfile.readline(MAX_LINE + 1)
        except TimeoutError:
            return None
        if not line:
            return None
        conn.settimeout(self.read_timeout)
        try:
            return self._read_rest(rfile, line, peer, cancelled)
        except TimeoutError:
            log.info("control_request_timeout", peer_pid=peer.pid,
                     read_timeout_secs=self.read_timeout)
            return None

    def _read_rest(self, rfile: Any, line: bytes, peer: Peer, cancelled: Any
                   ) -> Request | None:
        if len(line) > MAX_LINE:
            raise _BadRequest("request line too long")
        try:
            method, target, version = line.decode("latin-1").split()
        except ValueError:
            raise _BadRequest("malformed request line") from None
        headers: dict[str, str] = {}
        lengths: list[str] = []
        for _ in range(MAX_HEADERS + 1):
            h = rfile.readline(MAX_LINE + 1)
            if h in (b"\r\n", b"\n", b""):
                break
            if len(h) > MAX_LINE:
                raise _BadRequest("header line too long")
            name, sep, value = h.decode("latin-1").partition(":")
            if not sep:
                raise _BadRequest("malformed header line")
            key = name.strip().lower()
            headers[key] = value.strip()
            if key == "content-length":
                lengths += value.split(",")
        else:
            raise _BadRequest("too many headers")
        try:
            n = content_length(lengths, MAX_BODY)
        except BadContentLength as exc:
            raise _BadRequest(str(exc)) from None
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise _BadRequest("chunked bodies are not supported; send Content-Length")
        body = rfile.read(n) if n else b""
        if len(body) != n:
            return None
        conn_hdr = headers.get("connection", "").lower()
        keep = (version == "HTTP/1.1" and conn_hdr != "close") or conn_hdr == "keep-alive"
        path, _, query = target.partition("?")
        return Request(method=method.upper(), path=path, query=_parse_query(query),
                       body=body, peer_pid=peer.pid, peer_uid=peer.uid, keep_alive=keep,
                       cancelled=cancelled)

    @staticmethod
    def _send(conn: socket.socket, status: int, body: Any, close: bool) -> None:
        conn.sendall(_response(status, body, close))


def _response(status: int, body: Any, close: bool) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode("latin-1")
    return head + data


def _parse_query(query: str) -> dict[str, str]:
    return dict(parse_qsl(query)) if query else {}


def _peer_closed(conn: socket.socket) -> bool:
    """True when the client closed its end (EOF readable) while we wait for a lease."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return False
        return conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True
