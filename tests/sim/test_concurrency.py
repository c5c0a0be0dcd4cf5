"""Many concurrent SSE streams on one simulator: every one complete and well framed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from llmux_testkit.sim import SimProcess

STREAMS = 128
TOKENS = 20


async def _one_stream(port: int, i: int) -> list[str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"prompt": f"p{i}", "max_tokens": TOKENS, "stream": True,
                       "ignore_eos": True, "temperature": 0}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding: chunked" in head.lower()
    payload = b""
    while True:  # de-chunk
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            break
        payload += await reader.readexactly(size)
        await reader.readexactly(2)
    writer.close()
    events = payload.decode().split("\n\n")
    assert events[-1] == ""
    return [e.removeprefix("data: ") for e in events[:-1]]


async def _all(port: int) -> list[list[str]]:
    return await asyncio.wait_for(
        asyncio.gather(*(_one_stream(port, i) for i in range(STREAMS))), 120)


def test_many_concurrent_streams_all_complete(tmp_path: Path) -> None:
    with SimProcess("m", time_scale=1.0, log_path=tmp_path / "sim.log",
                    args=["--sim-token-rate", "100", "--sim-load-s", "0",
                          "--sim-warmup-s", "0"]) as s:
        results = asyncio.run(_all(s.port))
        assert len(results) == STREAMS
        for events in results:
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert len(chunks) == TOKENS
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert "Traceback" not in s.log()
        assert s.state()["running"] == 0
