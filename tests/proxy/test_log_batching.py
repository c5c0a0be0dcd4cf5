"""The request log's batched writes (issue 11, P1/P2), on a StringIO stdout."""

from __future__ import annotations

import asyncio
import io

import pytest

from llmuxd.proxy.logs import _StepBuffered, lazy_delay


def recording() -> tuple[io.StringIO, list[str]]:
    """A stdout stand-in and the list of its write() calls, one entry per call."""
    out = io.StringIO()
    writes: list[str] = []
    real_write = out.write
    out.write = lambda s: writes.append(s) or real_write(s)  # type: ignore[method-assign]
    return out, writes


def test_log_lines_of_one_step_are_written_together_and_in_order() -> None:
    out, writes = recording()

    async def main() -> str:
        b = _StepBuffered(out)
        for line in ("a\n", "b\n", "c\n"):
            b.write(line)
            b.flush()
        seen = out.getvalue()
        deadline = asyncio.get_running_loop().time() + 5
        while not writes:
            assert asyncio.get_running_loop().time() < deadline, "never written"
            await asyncio.sleep(0.005)
        return seen

    assert asyncio.run(main()) == ""
    assert writes == ["a\nb\nc\n"]


def test_lines_of_consecutive_steps_share_a_write_and_a_full_batch_goes_at_once() -> None:
    out, writes = recording()

    async def main() -> None:
        b = _StepBuffered(out)
        b.DELAY = 3600.0
        for i in range(3):
            b.write(f"{i}\n")
            b.flush()
            await asyncio.sleep(0)           # another turn of the loop
        assert writes == []
        for i in range(3, b.MAX_LINES):
            b.write(f"{i}\n")
            b.flush()
        assert writes == ["".join(f"{i}\n" for i in range(b.MAX_LINES))]
        b.write("last\n")
        b.flush()
        b.write_out()                        # what the worker's exit runs
        assert writes[-1] == "last\n"

    asyncio.run(main())


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


@pytest.mark.parametrize("fields", [
    ("abc123", "/v1/chat/completions", "alias-a", "model-a", 200, None, 0.0, 0.003, False,
     450, 1.569, 1.605, 2.503),
    ("r.1:x-2", "/v1/completions", 'we"ird\\\u00e9\U0001f600', "m", 502,
     'upstream failed: "x"\n', 12.5, 0, True, 0, None, 1e-07, 123456.789),
    ("r", "/v1/embeddings", "m", "m", 499, "client disconnected", 3, 1.0, False, 1 << 40,
     2, 0.0, float("inf")),
])
def test_the_proxied_line_is_the_generic_line(fields: tuple[object, ...],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The fast path's formatted line is byte for byte what ``info`` writes for the same
    fields (log readers parse one shape)."""
    import json
    import re

    from llmuxd.proxy.logs import request_logger

    log = request_logger()
    (request_id, path, model, served, status, error, waited, lease_ms, switched, nbytes,
     ttfb, upstream, duration) = fields
    log.proxied(*fields)  # type: ignore[arg-type]
    fast = capsys.readouterr().out
    log.info("request", request_id=request_id, method="POST", path=path, model=model,
             served_model=served, status=status, error=error, waited_ms=waited,
             lease_ms=lease_ms, switched=switched, bytes=nbytes, ttfb_ms=ttfb,
             upstream_ms=upstream, duration_ms=duration)
    generic = capsys.readouterr().out
    cut = fast.index('"timestamp": "') + len('"timestamp": "')
    assert fast[:cut] == generic[:cut]          # all but the time itself
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"
    assert re.fullmatch(stamp, json.loads(fast)["timestamp"]), fast
    assert fast[cut:].endswith('Z"}\n') and len(fast) == len(generic)


@pytest.mark.parametrize(("raw", "expected"), [
    ("3600", 3600.0), ("0", 0.0), ("0.5", 0.5),
    ("", 0.02), ("soon", 0.02), ("nan", 0.02), ("inf", 0.02), ("-1", 0.02), ("3601", 0.02),
])
def test_the_lazy_delay_is_overridden_only_by_a_sane_number(
        monkeypatch: pytest.MonkeyPatch, raw: str, expected: float) -> None:
    """``LLMUX_LAZY_FLUSH_SECS`` (a test knob: an hour makes a worker's exit flush the
    only way out for what it holds back) never turns into a negative, endless or
    not-a-number timer."""
    monkeypatch.setenv("LLMUX_LAZY_FLUSH_SECS", raw)
    assert lazy_delay() == expected
