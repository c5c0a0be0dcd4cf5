"""The request log's per-loop-step writes (issue 11, P2), on a StringIO stdout."""

from __future__ import annotations

import asyncio
import io

from llmuxd.proxy.logs import _StepBuffered


def test_log_lines_of_one_step_are_written_together_and_in_order() -> None:
    out = io.StringIO()
    writes: list[str] = []
    real_write = out.write
    out.write = lambda s: writes.append(s) or real_write(s)  # type: ignore[method-assign]

    async def main() -> str:
        b = _StepBuffered(out)
        for line in ("a\n", "b\n", "c\n"):
            b.write(line)
            b.flush()
        seen = out.getvalue()
        await asyncio.sleep(0)
        return seen

    assert asyncio.run(main()) == ""
    assert writes == ["a\nb\nc\n"]


def test_log_lines_outside_a_loop_are_written_at_once() -> None:
    out = io.StringIO()
    b = _StepBuffered(out)
    b.write("x\n")
    b.flush()
    assert out.getvalue() == "x\n"
