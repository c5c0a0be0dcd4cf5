"""A minimal HTTP/1.1 client connection, for the two hops every request makes.

Why not ``http.client``: it parses every response head with the ``email``
package and sends head and body in separate syscalls; on the hot path (lease,
forward, release: three round trips per proxied request) that was a third of the
front end's CPU. This client sends each request in one ``sendall``, parses the
head with plain byte splits, and reads bodies by Content-Length, chunked or
until close. It talks only to peers we start ourselves (llmuxd, vLLM children on
loopback) and is strict: anything unexpected closes the connection.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable

MAX_HEAD = 65536
RECV = 65536
# An idle connection younger than this is used without the liveness check (a select):
# servers close idle ones after seconds (uvicorn: 5), and a send that still meets a
# closed one is retried on a fresh connection anyway.
FRESH_SECS = 1.0


class ProtocolError(OSError):
    """The peer broke HTTP/1.1 framing or closed the connection early."""


class PeerClosed(ProtocolError):
    """The peer closed before sending any byte of the answer (safe to retry)."""


class Head:
    """Status line and headers of one response, and how its body is framed."""

    __slots__ = ("chunked", "headers", "keep_alive", "length", "status")

    def __init__(self, status: int, headers: list[tuple[str, str]], length: int | None,
                 chunked: bool, keep_alive: bool) -> None:
        self.status = status
        self.headers = headers
        self.length = length
        self.chunked = chunked
        self.keep_alive = keep_alive

    def get(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class Connection:
    """One kept-alive connection; a single request/response at a time."""

    __slots__ = ("_chunk_left", "_crlf_due", "_remaining", "buf", "connect", "done",
                 "head", "idle_since", "pending", "sock")

    def __init__(self, connect: Callable[[], socket.socket]) -> None:
        self.connect = connect
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.head: Head | None = None
        self.done = True
        # A request sent whose answer is still to be read (pipelining; see LeaseClient).
        self.pending: bytes | None = None
        self.idle_since = 0.0
        self._remaining = 0
        self._chunk_left = 0
        self._crlf_due = False

    def idle_ok(self) -> bool:
        """Whether an idle kept-alive connection still looks usable: connected, and
        neither closed by the peer nor holding unexpected bytes (one cheap peek)."""
        if self.sock is None:
            return False
        if self.pending is not None:
            return True  # its answer is expected; reading it will tell
        if time.monotonic() - self.idle_since < FRESH_SECS:
            return True  # peers close idle connections after seconds, not sooner
        # select, not a MSG_DONTWAIT recv: a socket with a timeout polls before recv.
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        # Readable while idle means closed by the peer (EOF) or bytes nobody asked for.
        return not readable

    # -- request ------------------------------------------------------------

    def send(self, data: bytes, timeout: float) -> None:
        """Send one whole request (connecting first if there is no connection)."""
        if self.sock is None:
            self.sock = self.connect()
        self.sock.settimeout(timeout)
        self.buf.clear()
        self.head = None
        self.done = False
        self.sock.sendall(data)

    # -- response -----------------------------------------------------------

    def _fill(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(RECV)
        if not data:
            raise ProtocolError("the peer closed the connection mid-answer")
        self.buf += data

    def read_head(self) -> Head:
        """The final response head (interim 1xx answers are skipped)."""
        while True:
            head = self._read_one_head()
            if not (100 <= head.status < 200 and head.status != 101):
                return head

    def _read_one_head(self) -> Head:
        assert self.sock is not None
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buf) > MAX_HEAD:
                raise ProtocolError("response head too large")
            data = self.sock.recv(RECV)
            if not data:
                if not self.buf:
                    raise PeerClosed("the peer closed the connection without answering")
                raise ProtocolError("the peer closed the connection mid-head")
            self.buf += data
        raw = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[:end + 4]
        lines = raw.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        keep_alive = parts[0] == "HTTP/1.1"
        headers: list[tuple[str, str]] = []
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ProtocolError(f"bad header line {line[:80]!r}")
            value = value.strip()
            lname = name.strip().lower()
            if lname == "content-length":
                length = int(value)
            elif lname == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif lname == "connection":
                tokens = value.lower()
                if "close" in tokens:
                    keep_alive = False
                elif "keep-alive" in tokens:
                    keep_alive = True
            headers.append((name.strip(), value))
        if chunked:
            length = None
        elif status in (204, 304) or 100 <= status < 200:
            length = 0
        if length is None and not chunked:
            keep_alive = False  # the body runs until the peer closes
        head = Head(status, headers, length, chunked, keep_alive)
        self.head = head
        self._remaining = length if length is not None else -1
        self._chunk_left = 0
        self._crlf_due = False
        self.done = length == 0
        return head

    def read_some(self) -> bytes:
        """The next piece of the body as it arrives; b"" once it has ended."""
        if self.done:
            return b""
        head = self.head
        assert head is not None and self.sock is not None
        if head.chunked:
            return self._read_chunked()
        if self._remaining < 0:  # until close
            if self.buf:
                data = bytes(self.buf)
                self.buf.clear()
                return data
            data = self.sock.recv(RECV)
            if not data:
                self.done = True
            return data
        if self.buf:
            n = min(len(self.buf), self._remaining)
            data = bytes(self.buf[:n])
            del self.buf[:n]
        else:
            data = self.sock.recv(min(RECV, self._remaining))
            if not data:
                raise ProtocolError(f"the peer closed with {self._remaining} body bytes "
                                    "missing")
        self._remaining -= len(data)
        if self._remaining == 0:
            self.done = True
        return data

    def _read_chunked(self) -> bytes:
        while True:
            if self._crlf_due:
                while len(self.buf) < 2:
                    self._fill()
                if self.buf[:2] != b"\r\n":
                    raise ProtocolError("bad chunk terminator")
                del self.buf[:2]
                self._crlf_due = False
            if self._chunk_left == 0:
                end = self.buf.find(b"\r\n")
                while end < 0:
                    if len(self.buf) > MAX_HEAD:
                        raise ProtocolError("chunk size line too long")
                    self._fill()
                    end = self.buf.find(b"\r\n")
                size_text = bytes(self.buf[:end]).split(b";", 1)[0].strip()
                del self.buf[:end + 2]
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
                if size == 0:
                    self._read_trailers()
                    self.done = True
                    return b""
                self._chunk_left = size
            if not self.buf:
                self._fill()
            n = min(len(self.buf), self._chunk_left)
            data = bytes(self.buf[:n])
            del self.buf[:n]
            self._chunk_left -= n
            if self._chunk_left == 0:
                self._crlf_due = True
            if data:
                return data

    def _read_trailers(self) -> None:
        while True:
            end = self.buf.find(b"\r\n")
            while end < 0:
                self._fill()
                end = self.buf.find(b"\r\n")
            line = bytes(self.buf[:end])
            del self.buf[:end + 2]
            if not line:
                return

    def read_all(self, limit: int = 64 << 20) -> bytes:
        """The whole body (for small control-API answers)."""
        parts: list[bytes] = []
        total = 0
        while True:
            data = self.read_some()
            if not data:
                return b"".join(parts)
            parts.append(data)
            total += len(data)
            if total > limit:
                raise ProtocolError("response body too large")

    @property
    def reusable(self) -> bool:
        """Whether the next request may go on this connection."""
        return (self.sock is not None and self.done and self.head is not None
                and self.head.keep_alive and not self.buf)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf.clear()
        self.done = True
        self.pending = None


class Pool:
    """Idle kept-alive connections to one peer, shared by a process's threads.

    Most recently used first, so a few connections stay warm and busy instead of one
    per thread going stale (children close idle connections after a few seconds,
    and every connection to llmuxd is a thread there)."""

    def __init__(self, connect: Callable[[], socket.socket], max_idle: int = 256) -> None:
        self.connect = connect
        self.max_idle = max_idle
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    def take(self) -> Connection:
        """An idle connection that still looks usable, else a new (unconnected) one."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return Connection(self.connect)
            if conn.idle_ok():
                return conn
            conn.close()

    def give_back(self, conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            if conn.sock is not None and len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def tcp_connector(host: str, port: int, timeout: float) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    return connect


def unix_connector(path: str, timeout: float) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return sock
    return connect
