"""A small HTTP/1.1 server layer on asyncio streams (keep-alive, chunked, SSE).

The simulator must carry hundreds of concurrent SSE streams on a 2-core box with
little CPU per chunk, so it speaks HTTP itself instead of pulling in an ASGI stack:
parse one request at a time per connection, answer with Content-Length or chunked
transfer encoding, keep the connection unless told otherwise. Response headers
mirror uvicorn's (vLLM's server) closely enough for clients and proxies.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from email.utils import formatdate
from urllib.parse import parse_qs, unquote, urlsplit

MAX_HEAD = 64 * 1024
MAX_BODY = 32 * 1024 * 1024

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request Entity Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class BadHttp(Exception):
    """The peer sent something that is not HTTP/1.x we can answer; close after replying."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    """One parsed request."""

    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    keep_alive: bool
    peer: str = ""
    extras: dict[str, object] = field(default_factory=dict)

    def json(self) -> object:
        """The body parsed as JSON (raises ValueError with the decoder's message)."""
        return json.loads(self.body.decode("utf-8") if self.body else "")

    def q(self, name: str) -> str | None:
        """The first value of query parameter `name`."""
        vals = self.query.get(name)
        return vals[0] if vals else None


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """Read one request; None on a clean EOF between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial.strip():
            return None
        raise BadHttp(400, "incomplete request head") from None
    except asyncio.LimitOverrunError:
        raise BadHttp(431, "request head too large") from None
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ", 2)
    except ValueError:
        raise BadHttp(400, "bad request line") from None
    if not version.startswith("HTTP/1."):
        raise BadHttp(400, "unsupported HTTP version")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BadHttp(400, "bad header line")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    conn = headers.get("connection", "").lower()
    keep_alive = "close" not in conn if version == "HTTP/1.1" else "keep-alive" in conn
    body = await _read_body(reader, headers)
    parts = urlsplit(target)
    return Request(
        method=method.upper(),
        target=target,
        path=unquote(parts.path) or "/",
        query=parse_qs(parts.query, keep_blank_values=True),
        headers=headers,
        body=body,
        keep_alive=keep_alive,
    )


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadHttp(400, "bad chunk size") from None
            if size == 0:
                # trailers, then the blank line
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY:
                raise BadHttp(413, "body too large")
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length_text = headers.get("content-length")
    if not length_text:
        return b""
    try:
        length = int(length_text)
    except ValueError:
        raise BadHttp(400, "bad content-length") from None
    if length < 0:
        raise BadHttp(400, "bad content-length")
    if length > MAX_BODY:
        raise BadHttp(413, "body too large")
    return await reader.readexactly(length) if length else b""


_date_cache: tuple[int, bytes] = (0, b"")


def _date_header() -> bytes:
    global _date_cache
    now = int(asyncio.get_running_loop().time())
    if _date_cache[0] != now or not _date_cache[1]:
        _date_cache = (now, formatdate(usegmt=True).encode())
    return _date_cache[1]


class Responder:
    """Writes responses on one connection; remembers whether it must close."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.close_after = False
        self.started = False

    def client_gone(self) -> bool:
        """True once the peer has closed (we only notice EOF/RST, not a half-close)."""
        return self.writer.is_closing() or self.reader.at_eof()

    def _head(self, status: int, headers: list[tuple[str, str]], close: bool) -> bytes:
        out = [
            b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "Unknown").encode()),
            b"date: " + _date_header() + b"\r\nserver: uvicorn\r\n",
        ]
        for k, v in headers:
            out.append(f"{k}: {v}\r\n".encode("latin-1"))
        if close:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        return b"".join(out)

    async def send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str | None = "application/json",
        headers: list[tuple[str, str]] | None = None,
        close: bool = False,
    ) -> None:
        """A whole response with Content-Length."""
        if close:
            self.close_after = True
        hs = [("content-length", str(len(body)))]
        if content_type:
            hs.append(("content-type", content_type))
        hs.extend(headers or [])
        self.started = True
        self.writer.write(self._head(status, hs, self.close_after) + body)
        await self.writer.drain()

    async def send_json(self, status: int, obj: object, close: bool = False) -> None:
        await self.send(status, dumps(obj), close=close)

    async def start_stream(self, content_type: str = "text/event-stream; charset=utf-8") -> None:
        """Begin a chunked response (SSE)."""
        self.started = True
        hs = [("content-type", content_type), ("transfer-encoding", "chunked")]
        self.writer.write(self._head(200, hs, self.close_after))
        await self.writer.drain()

    async def chunk(self, data: bytes) -> None:
        """One chunk of a chunked response."""
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self.writer.drain()

    async def end_stream(self) -> None:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()


def dumps(obj: object) -> bytes:
    """Compact JSON as vLLM (pydantic) writes it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
