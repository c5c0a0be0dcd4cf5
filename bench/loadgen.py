"""One small load generator used for every target (direct, llmux, nginx).

asyncio protocols over raw keep-alive HTTP/1.1 connections to 127.0.0.1: no HTTP
library in the loop, so the generator's own cost stays small and identical for
every target. Each run is bounded in request count *and* time.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field


@dataclass
class Result:
    """One request: status, timings (seconds), and SSE events seen."""

    status: int = 0
    latency: float = 0.0
    first_chunk: float | None = None
    events: int = 0
    ok: bool = False
    error: str = ""
    arrivals: list[float] = field(default_factory=list)


class _Conn(asyncio.Protocol):
    """A kept-alive client connection that runs one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.result = Result()
        self.started = 0.0
        self.head_done = False
        self.length: int | None = None
        self.chunked = False
        self.body_seen = 0
        self.tail = b""
        self.track_arrivals = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.result.error = f"connection lost: {exc}"
            self.waiter.set_result(None)

    def send(self, request: bytes, track_arrivals: bool = False) -> asyncio.Future[None]:
        assert self.transport is not None
        self.buf.clear()
        self.result = Result()
        self.head_done = False
        self.length = None
        self.chunked = False
        self.body_seen = 0
        self.tail = b""
        self.track_arrivals = track_arrivals
        self.waiter = asyncio.get_running_loop().create_future()
        self.started = time.perf_counter()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        r = self.result
        if not self.head_done:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            data = bytes(self.buf[end + 4:])
            self.buf.clear()
            self.head_done = True
            lines = head.split("\r\n")
            r.status = int(lines[0].split(" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                lname = name.strip().lower()
                if lname == "content-length":
                    self.length = int(value)
                elif lname == "transfer-encoding" and "chunked" in value.lower():
                    self.chunked = True
            if not data and (self.chunked or (self.length or 0) > 0):
                return
        if data:
            if r.first_chunk is None:
                r.first_chunk = now - self.started
            if self.track_arrivals:
                r.arrivals.append(now)
            joined = self.tail + data
            r.events += joined.count(b"\n\n") - self.tail.count(b"\n\n")
            self.tail = joined[-8:]
            self.body_seen += len(data)
        if self.chunked:
            done = self.tail.endswith(b"0\r\n\r\n")
        else:
            done = self.body_seen >= (self.length or 0)
        if done:
            r.latency = now - self.started
            r.ok = 200 <= r.status < 300
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)


def build_request(port: int, path: str, body: dict[str, object]) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
            ).encode() + data


async def _connect(port: int) -> _Conn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(_Conn, "127.0.0.1", port)
    return proto


async def _worker(port: int, request: bytes, deadline: float, remaining: list[int],
                  results: list[Result], timeout: float, track_arrivals: bool,
                  delay: float) -> None:
    conn: _Conn | None = None
    if delay:
        await asyncio.sleep(delay)
    while remaining[0] > 0 and time.perf_counter() < deadline:
        remaining[0] -= 1
        try:
            if conn is None or conn.closed:
                conn = await _connect(port)
            await asyncio.wait_for(conn.send(request, track_arrivals), timeout)
            results.append(conn.result)
            if not conn.result.ok and conn.transport is not None:
                conn.transport.close()
                conn = None
        except (OSError, TimeoutError) as exc:
            results.append(Result(error=f"{type(exc).__name__}: {exc}"))
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            conn = None
    if conn is not None and conn.transport is not None:
        conn.transport.close()


def run_load(port: int, path: str, body: dict[str, object], concurrency: int,
             max_requests: int, max_seconds: float, timeout: float = 60.0,
             track_arrivals: bool = False, stagger: float = 0.0
             ) -> tuple[list[Result], float]:
    """Run up to ``max_requests`` (and at most ``max_seconds``); (results, wall s).

    ``stagger``: each client starts after a random delay in [0, stagger) seconds, so a
    closed loop of long requests (streams) reaches a steady state instead of a burst."""
    request = build_request(port, path, body)
    results: list[Result] = []

    async def main() -> float:
        remaining = [max_requests]
        start = time.perf_counter()
        deadline = start + max_seconds
        rng = random.Random(1)
        await asyncio.gather(*[
            _worker(port, request, deadline, remaining, results, timeout, track_arrivals,
                    rng.uniform(0, stagger) if stagger else 0.0)
            for _ in range(concurrency)])
        return time.perf_counter() - start

    wall = asyncio.run(main())
    return results, wall


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100.0 * (len(ordered) - 1))))
    return ordered[k]
