"""Reading Server-Sent Events the strict way (framing is part of the contract)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import requests


def events(resp: requests.Response) -> Iterator[str]:
    """Yield each event's data, checking `data: ...` + blank-line framing."""
    buf = b""
    for piece in resp.iter_content(chunk_size=None):
        buf += piece
        while b"\n\n" in buf:
            raw, buf = buf.split(b"\n\n", 1)
            text = raw.decode("utf-8")
            assert text.startswith("data: "), f"SSE event not framed as 'data: ...': {text!r}"
            assert "\n" not in text, f"multi-line SSE event: {text!r}"
            yield text[len("data: "):]
    assert buf.strip() == b"", f"trailing bytes after the last event: {buf!r}"


def parse_stream(resp: requests.Response) -> tuple[list[dict[str, Any]], bool]:
    """All JSON chunks of a stream and whether it ended with [DONE] (nothing after)."""
    chunks: list[dict[str, Any]] = []
    done = False
    for data in events(resp):
        assert not done, f"event after [DONE]: {data!r}"
        if data == "[DONE]":
            done = True
            continue
        chunks.append(json.loads(data))
    return chunks, done
