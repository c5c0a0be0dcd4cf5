"""The proxied routes' raw ASGI fast path and the Falcon app behind it (real gunicorn).

The allow-listed ``POST /v1/<route>`` is served by llmuxd/proxy/fastpath.py, every
other request by the Falcon app. These pin the seam: what the fast path does not
take still gets Falcon's answers (404, 405, 401, non-canonical 404), what it takes
keeps Falcon's conventions (trailing slash, repeated headers joined, the request
body in pieces), and its errors carry the same headers. Requests go byte for byte
over raw sockets, so no client library cleans them up.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmuxd.proxy.relay import Outcome

from .conftest import Stack, served, wait_for

KEY = "sk-fast-key"
CHAT = json.dumps({"model": "model-a", "messages": []}).encode()


def _serve(tmp: Path, extra_proxy: str) -> Iterator[Stack]:
    with Stack(tmp, extra_proxy=extra_proxy) as stack, served(stack):
        yield stack


@pytest.fixture(scope="module")
def open_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from _serve(tmp_path_factory.mktemp("fast-open"), "max_body_bytes = 4096")


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from _serve(tmp_path_factory.mktemp("fast-keyed"), f'api_keys = ["{KEY}"]')


def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is (it must say ``Connection: close``); status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return int(lines[0].split(" ", 2)[1]), headers, body


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


def request(method: str, target: str, body: bytes = b"",
            headers: list[tuple[str, str]] | None = None) -> bytes:
    head = [f"{method} {target} HTTP/1.1", "Host: x", "Connection: close",
            "Content-Type: application/json", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers or []]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


FALCON_ANSWERS = [
    ("POST", "/v1/sleep", 404, "not_found"),
    ("POST", "/v1/chat/completions/extra", 404, "not_found"),
    ("POST", "/V1/completions", 404, "not_found"),
    ("POST", "/v1//completions", 404, "not_found"),
    ("POST", "/v1/./completions", 404, "not_found"),
    ("POST", "/v1/%2Fcompletions", 404, "not_found"),
    # Decodes to an allow-listed route: only the canonical check keeps it from the model.
    ("POST", "/v1/chat%2Fcompletions", 404, "not_found"),
    ("POST", "/v1/chat%2fcompletions/", 404, "not_found"),
    ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ("PUT", "/v1/completions", 405, "method_not_allowed"),
    ("POST", "/v1/models", 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("method", "target", "status", "code"), FALCON_ANSWERS)
def test_requests_the_fast_path_does_not_take_get_falcons_answers(
        open_stack: Stack, method: str, target: str, status: int, code: str) -> None:
    before = len(open_stack.child_a.paths)
    got, headers, body = exchange(open_stack.port, request(
        method, target, CHAT, [("X-Request-Id", "seam-1")]))
    assert got == status, (target, body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert headers["x-request-id"] == "seam-1"
    assert len(open_stack.child_a.paths) == before, "the request reached the model"


@pytest.mark.parametrize(("method", "target"), [("POST", "/v1/sleep"),
                                                ("POST", "/v1/chat/completions/extra"),
                                                ("GET", "/v1/chat/completions")])
def test_with_keys_what_falls_to_falcon_is_401_before_404_or_405(
        keyed_stack: Stack, method: str, target: str) -> None:
    got, _, body = exchange(keyed_stack.port, request(method, target, CHAT))
    assert got == 401, body
    assert json.loads(body)["error"]["code"] == "invalid_api_key"


def test_trailing_slash_and_query_reach_the_child_as_falcon_routed_them(
        open_stack: Stack) -> None:
    got, headers, body = exchange(open_stack.port, request(
        "POST", "/v1/chat/completions/?a=1&b=%20x", CHAT))
    assert got == 200, body
    assert json.loads(body)["path"] == "/v1/chat/completions?a=1&b=%20x"
    assert headers["x-child"] == "yes"


def test_a_request_body_sent_in_pieces_arrives_whole(open_stack: Stack) -> None:
    pieces = [CHAT[:5], CHAT[5:17], CHAT[17:]]
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    got, _, body = exchange(open_stack.port, head + chunked)
    assert got == 200, body
    assert json.loads(body)["model"] == "model-a"


def test_a_chunked_body_over_the_limit_is_413_and_takes_no_lease(open_stack: Stack) -> None:
    # Releases are pipelined: let the earlier tests' land before counting.
    wait_for(lambda: not open_stack.daemon.leases, what="earlier leases released")
    releases = len(open_stack.daemon.releases)
    piece = b" " * 3000
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(2)) + b"0\r\n\r\n"
    got, headers, answer = exchange(open_stack.port, head + body)
    assert got == 413, answer
    assert json.loads(answer)["error"]["code"] == "request_too_large"
    assert "x-request-id" in headers
    assert open_stack.daemon.in_flight("model-a") == 0
    assert len(open_stack.daemon.releases) == releases


def test_a_repeated_request_id_is_not_trusted(open_stack: Stack) -> None:
    got, headers, body = exchange(open_stack.port, request(
        "POST", "/v1/chat/completions", CHAT, [("X-Request-Id", "a"), ("X-Request-Id", "b")]))
    assert got == 200, body
    # Joined as "a,b" (Falcon's reading of a repeated header), which is not a valid id.
    assert re.fullmatch(r"[0-9a-f]{24}", headers["x-request-id"]), headers
    assert json.loads(body)["headers"]["x-request-id"] == headers["x-request-id"]


def test_a_repeated_authorization_header_is_401(keyed_stack: Stack) -> None:
    bearer = ("Authorization", f"Bearer {KEY}")
    got, _, body = exchange(keyed_stack.port, request(
        "POST", "/v1/chat/completions", CHAT, [bearer, bearer]))
    assert got == 401, body
    got, _, body = exchange(keyed_stack.port, request(
        "POST", "/v1/chat/completions", CHAT, [bearer]))
    assert got == 200, body


def test_a_refusal_from_the_fast_path_carries_retry_after_and_the_request_id(
        open_stack: Stack) -> None:
    got, headers, body = exchange(open_stack.port, request(
        "POST", "/v1/completions", json.dumps({"model": "model-full"}).encode(),
        [("X-Request-Id", "full-1")]))
    assert got == 429, body
    assert json.loads(body)["error"]["code"] == "queue_full"
    assert headers["retry-after"] == "1"
    assert headers["x-request-id"] == "full-1"
    assert headers["content-type"] == "application/json"


@pytest.mark.parametrize("outcome", [
    Outcome(status=200, bytes=12, ttfb_ms=1.234, duration_ms=3.14159),
    Outcome(status=499, error='client "left"\n\u00e9', duration_ms=0),
    Outcome(status=502, ttfb_ms=2, duration_ms=1e-7),
    Outcome(status=504, bytes=1 << 40, ttfb_ms=123456.789, duration_ms=98765.4321),
])
def test_the_release_line_is_the_json_of_the_outcome(outcome: Outcome) -> None:
    # Rendered without json.dumps on the hot path; the daemon reads it as JSON.
    assert json.loads(outcome.release_json(1234.5)) == {**outcome.release_body(),
                                                        "ended_at": 1234.5}


def test_a_stream_to_a_late_reader_pauses_the_child_and_arrives_whole(
        open_stack: Stack) -> None:
    """30 MB of SSE to a client that starts reading late: more than every buffer on
    the way holds, so the relay must stop reading from the child while the client's
    buffer is full and resume when it drains (a relay that never resumed hangs here
    until the client's timeout; one that did not pause would hold it all in memory)."""
    import http.client
    import time

    chunks, pad = 300, 100_000
    conn = http.client.HTTPConnection("127.0.0.1", open_stack.port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "model-b", "stream": True, "chunks": chunks, "pad": pad}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        # Not a synchronisation: a reader that starts late, so that the buffers fill.
        time.sleep(0.5)
        data = resp.read()
    finally:
        conn.close()
    events = [e for e in data.split(b"\n\n") if e]
    assert len(events) == chunks + 1
    assert events[-1] == b"data: [DONE]"
    assert all(len(e) > pad for e in events[:-1])
    wait_for(lambda: not open_stack.daemon.in_flight("model-b"), what="the release")
    assert open_stack.daemon.releases[-1]["status"] == 200
    assert open_stack.daemon.releases[-1]["bytes"] >= chunks * pad
    assert open_stack.daemon.releases[-1]["error"] is None
