"""The request log's per-loop-step writes (issue 11, P2), on a StringIO stdout."""

from __future__ import annotations

import asyncio
import io

import pytest

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


def test_the_request_line_has_the_structlog_shape(capsys: pytest.CaptureFixture[str]) -> None:
    """Same keys, order and JSON as structlog's JSONRenderer after ``_Stamp`` (what
    log readers and tests/proxy parse), without structlog's per-call machinery."""
    import json
    import re

    from llmuxd.proxy.logs import request_logger

    log = request_logger()
    log.info("request", request_id="r1", status=200, model=None, weird=object())
    text = capsys.readouterr().out
    assert text.endswith("\n") and text.count("\n") == 1
    line = json.loads(text)
    assert list(line) == ["request_id", "status", "model", "weird", "event", "level",
                          "timestamp"]
    assert line["event"] == "request" and line["level"] == "info"
    assert line["weird"].startswith("<object object at")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["timestamp"])
    assert text.startswith('{"request_id": "r1", "status": 200, "model": null')
