"""The worker's head coalescing (issue 11, P2): write order and the at-most-one-
loop-step delay, on a fake transport; the real worker is covered by
tests/proxy/test_e2e.py and tests/proxy/test_gunicorn.py."""

from __future__ import annotations

import asyncio

from llmuxd.proxy.worker import HeadCoalescer


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_head_and_first_body_piece_leave_in_one_write() -> None:
    async def main() -> list[bytes]:
        t = FakeTransport()
        c = HeadCoalescer(t, asyncio.get_running_loop())
        c.write(b"HEAD")
        c.write(b"body")
        c.write(b"more")
        await asyncio.sleep(0)
        return t.writes

    assert asyncio.run(main()) == [b"HEADbody", b"more"]


def test_a_head_without_a_body_yet_goes_out_at_the_end_of_the_step() -> None:
    async def main() -> tuple[list[bytes], list[bytes]]:
        t = FakeTransport()
        c = HeadCoalescer(t, asyncio.get_running_loop())
        c.write(b"HEAD")
        before = list(t.writes)
        await asyncio.sleep(0)
        after = list(t.writes)
        c.write(b"late")
        return before, after + t.writes[len(after):]

    before, after = asyncio.run(main())
    assert before == []
    assert after == [b"HEAD", b"late"]


def test_close_sends_a_held_head_first() -> None:
    async def main() -> list[bytes]:
        t = FakeTransport()
        c = HeadCoalescer(t, asyncio.get_running_loop())
        c.write(b"HEAD")
        c.close()
        assert t.closed
        return t.writes

    assert asyncio.run(main()) == [b"HEAD"]
