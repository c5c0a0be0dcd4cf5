"""The front end's client for llmuxd's control API on its Unix socket.

Every proxied request costs two calls here (lease, release), so the client is
built for cost: a minimal HTTP/1.1 client over AF_UNIX (``http1.py``; far less
CPU than ``requests`` or even ``http.client``), kept-alive connections shared by the
process's threads (most recently used first: no connect per call, and few
connections, each of which is a thread in llmuxd), and a reconnect when a kept-alive
connection turns out to be dead. Leases belong to the peer pid (SO_PEERCRED), not to
a connection, so any thread may use any connection, and a worker that dies loses its
leases in the daemon without any help from here.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from dataclasses import dataclass
from typing import Any

from llmuxd.proxy.http1 import Connection, PeerClosed, Pool, unix_connector


class DaemonUnavailable(Exception):
    """The socket could not be reached or the daemon broke the connection."""


class ClientGone(Exception):
    """The client hung up while its request waited for a lease."""


class DaemonError(Exception):
    """The daemon answered with an error in the control API's shape."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Lease:
    """A granted lease: where to send the request and under which model name."""

    lease_id: str
    model: str
    upstream: str
    served_model_name: str
    waited_ms: float
    switched: bool
    host: str
    port: int


class LeaseClient:
    """Thread-safe: calls take a kept-alive connection from a shared pool and put it back."""

    def __init__(self, socket_path: str, lease_timeout: float, call_timeout: float = 10.0
                 ) -> None:
        self.socket_path = socket_path
        # A lease may legitimately block for the whole request timeout (a switch).
        self.lease_timeout = lease_timeout
        self.call_timeout = call_timeout
        self.pool = Pool(unix_connector(socket_path, call_timeout))

    # -- the routes the front end uses -------------------------------------

    def acquire(self, model: str, client: socket.socket | None = None) -> Lease:
        """Block until llmuxd grants a lease on ``model`` (or refuses it).

        With ``client`` (the requester's socket), a client that hangs up while the
        lease waits (a switch can take minutes) raises ClientGone and closes our
        connection to the daemon, which takes the waiter out of the model's queue."""
        request = _request("POST", "/v1/leases", {"model": model})
        if client is None:
            data = self._call_raw(request, self.lease_timeout)
        else:
            data = self._call_watching(request, client)
        upstream = data["upstream"]
        host, port = _host_port(upstream)
        return Lease(lease_id=data["lease_id"], model=data.get("model", model),
                     upstream=upstream,
                     served_model_name=data.get("served_model_name") or data.get("model")
                     or model,
                     waited_ms=float(data.get("waited_ms") or 0.0),
                     switched=bool(data.get("switched")), host=host, port=port)

    def release(self, lease_id: str, outcome: dict[str, Any]) -> None:
        """Hand a lease back with the request's outcome (for metrics and drain).

        Sent without waiting for the answer (HTTP/1.1 pipelining): the connection goes
        back to the pool with the answer unread, and whoever takes it next reads it
        first, so the worker thread, and with it the client's kept-alive connection,
        is free at once. Should that answer never come, the release is sent again on a
        fresh connection (the daemon treats a second release of a lease as a no-op)."""
        request = _request("POST", f"/v1/leases/{lease_id}/release", outcome)
        conn = self._take()
        try:
            conn.send(request, self.call_timeout)
        except OSError:
            conn.close()
            self._call_raw(request, self.call_timeout)
            return
        conn.pending = request
        self.pool.give_back(conn)

    def release_now(self, lease_id: str, outcome: dict[str, Any]) -> dict[str, Any]:
        """Hand a lease back and wait for the answer: ``"revoked"`` says why the daemon
        took it back first (e.g. a hung child it killed), for the client's error."""
        answer = self._call("POST", f"/v1/leases/{lease_id}/release", outcome,
                            self.call_timeout)
        return answer if isinstance(answer, dict) else {}

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/v1/status", None, self.call_timeout)

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/v1/health", None, self.call_timeout)

    def close(self) -> None:
        self.pool.close()

    # -- transport ----------------------------------------------------------

    def _take(self) -> Connection:
        """A pooled connection, with any pipelined release on it settled."""
        conn = self.pool.take()
        request = conn.pending
        if request is None:
            return conn
        conn.pending = None
        try:
            conn.read_head()
            conn.read_all()
        except (OSError, ValueError):
            conn.close()
            # If this fails too, the daemon reclaims our leases when the worker ends.
            with contextlib.suppress(DaemonUnavailable, DaemonError):
                self._call_raw(request, self.call_timeout)
            return Connection(self.pool.connect)
        if not conn.reusable:
            conn.close()
        return conn

    def _done(self, conn: Connection) -> None:
        if conn.reusable:
            self.pool.give_back(conn)
        else:
            conn.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None,
              timeout: float) -> Any:
        return self._call_raw(_request(method, path, body), timeout)

    def _call_raw(self, request: bytes, timeout: float) -> Any:
        conn = self._take()
        for attempt in (0, 1):
            reused = conn.sock is not None
            try:
                conn.send(request, timeout)
                head = conn.read_head()
                raw = conn.read_all()
            except (PeerClosed, BrokenPipeError, ConnectionResetError) as exc:
                # A kept-alive connection the daemon closed while idle: retry once fresh.
                conn.close()
                if reused and attempt == 0:
                    continue
                raise DaemonUnavailable(self._describe(exc)) from None
            except (OSError, ValueError) as exc:
                conn.close()
                raise DaemonUnavailable(self._describe(exc)) from None
            self._done(conn)
            return _decode(head.status, raw)
        raise AssertionError("unreachable")

    def _call_watching(self, request: bytes, client: socket.socket) -> Any:
        conn = self._take()
        try:
            conn.send(request, self.lease_timeout)
        except OSError:
            conn.close()
            return self._call_raw(request, self.lease_timeout)
        assert conn.sock is not None
        deadline = time.monotonic() + self.lease_timeout
        watch: socket.socket | None = client
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                conn.close()
                raise DaemonUnavailable("no answer to the lease request in time")
            ready, _, _ = select.select([conn.sock] + ([watch] if watch else []), [], [],
                                        left)
            if conn.sock in ready:
                break
            if watch is not None and watch in ready:
                try:
                    peek = watch.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    peek = b""
                if not peek:
                    conn.close()  # the daemon drops the waiter with the connection
                    raise ClientGone("the client closed its connection while waiting")
                watch = None  # it sent more (a pipelined request): stop watching
        try:
            head = conn.read_head()
            raw = conn.read_all()
        except (OSError, ValueError) as exc:
            conn.close()
            if isinstance(exc, PeerClosed):  # a stale kept-alive connection
                return self._call_raw(request, self.lease_timeout)
            raise DaemonUnavailable(self._describe(exc)) from None
        self._done(conn)
        return _decode(head.status, raw)

    def _describe(self, exc: BaseException) -> str:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"{self.socket_path}: {detail or type(exc).__name__}"


def _request(method: str, path: str, body: dict[str, Any] | None) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    return (f"{method} {path} HTTP/1.1\r\nHost: llmuxd\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            ).encode() + payload


def _decode(status: int, raw: bytes) -> Any:
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        data = None
    if status >= 400:
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            raise DaemonError(status, str(err.get("code") or "internal"),
                              str(err.get("message") or f"daemon answered {status}"))
        raise DaemonError(status, "internal", f"daemon answered {status}")
    if data is None:
        raise DaemonUnavailable("daemon answered with invalid JSON")
    return data


def _host_port(upstream: str) -> tuple[str, int]:
    """``http://127.0.0.1:8001`` → ("127.0.0.1", 8001); ``unix:/P.sock`` → ("unix:/P.sock", 0)."""
    if upstream.startswith("unix:"):
        return upstream, 0
    rest = upstream.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)
