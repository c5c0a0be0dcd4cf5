"""The upstream connection's reads: pieces that arrived together leave together.

Why: with 1,024 open streams a worker's loop falls behind, and several of a
stream's pieces wait in its buffer; sending each separately costs a send (and the
ASGI server's framing) per piece, exactly when the worker has least time. A reader
that keeps up still gets every piece as it comes (no batching, no delay)."""

from __future__ import annotations

import asyncio
import time

from llmuxd.proxy.upstream import Connection


class _Transport:
    """Just what Connection calls on a transport (no socket needed for the parser)."""

    def __init__(self) -> None:
        self.aborted = False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def abort(self) -> None:
        self.aborted = True


def test_pieces_that_arrived_together_are_read_as_one_and_later_ones_alone() -> None:
    async def main() -> None:
        conn = Connection("http://127.0.0.1:1")
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                           b"transfer-encoding: chunked\r\n\r\n"
                           b"7\r\ndata: a\r\n7\r\ndata: b\r\n")
        await conn.head(10, deadline)
        assert await conn.read(10, deadline) == b"data: adata: b"
        assert conn.buffered == 0

        # One piece at a time when the reader keeps up.
        pending = asyncio.ensure_future(conn.read(10, deadline))
        await asyncio.sleep(0)
        assert not pending.done()
        conn.data_received(b"7\r\ndata: c\r\n")
        assert await asyncio.wait_for(pending, 10) == b"data: c"

        conn.data_received(b"0\r\n\r\n")
        assert await conn.read(10, deadline) == b""
        assert conn.reusable
        conn.close()

    asyncio.run(main())


def test_pushed_pieces_of_one_read_reach_the_sink_as_one_write() -> None:
    """Push mode (the fast path relays streams this way): no task wake-up per piece,
    and the pieces of one read leave in one write; what came with the head first."""
    async def main() -> None:
        conn = Connection("http://127.0.0.1:1")
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        conn.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                           b"7\r\ndata: a\r\n")
        await conn.head(10, deadline)
        got: list[bytes] = []
        conn.push_to(got.append)
        assert got == [b"data: a"]
        conn.data_received(b"7\r\ndata: b\r\n7\r\ndata: c\r\n")
        assert got == [b"data: a", b"data: bdata: c"]
        waiting = asyncio.ensure_future(conn.wait_pushed(10, deadline))
        await asyncio.sleep(0)
        assert not waiting.done(), "a pushed piece must not wake the relaying task"
        conn.data_received(b"0\r\n\r\n")
        await asyncio.wait_for(waiting, 10)
        assert conn.done and conn.reusable
        conn.close()

    asyncio.run(main())
