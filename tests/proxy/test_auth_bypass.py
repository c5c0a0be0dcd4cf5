"""API keys cannot be skipped by spelling the path differently (real gunicorn).

The review found that ``//v1/...``, ``/%2Fv1/...``, an absolute URI with ``//v1``
and ``GET //v1/models`` answered 200 without a key, because the key check looked
at the path string while the router normalised it. Each form is sent byte for
byte on a raw socket (no client library to clean it up) to a real gunicorn.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Stack, served

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("keyed")
    with Stack(tmp, extra_proxy=f'api_keys = ["{KEY}"]') as stack, served(stack):
        yield stack


def raw(port: int, method: str, target: str, body: bytes = b"",
        headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Send one request with ``target`` exactly as given; (status, body)."""
    head = [f"{method} {target} HTTP/1.1", "Host: x", "Connection: close",
            f"Content-Length: {len(body)}", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


CHAT = json.dumps({"model": "model-a", "messages": []}).encode()

BYPASS_FORMS = [
    ("POST", "//v1/chat/completions", CHAT),
    ("POST", "/%2Fv1/chat/completions", CHAT),
    ("POST", "/%2fv1/chat/completions", CHAT),
    ("POST", "http://x//v1/chat/completions", CHAT),
    ("GET", "//v1/models", b""),
    ("GET", "///v1/models", b""),
    ("POST", "/v1//chat/completions", CHAT),
    ("POST", "/v1/chat%2Fcompletions", CHAT),
]


@pytest.mark.parametrize(("method", "target", "body"), BYPASS_FORMS)
def test_bypass_forms_never_reach_a_model_without_a_key(
        keyed: Stack, method: str, target: str, body: bytes) -> None:
    before = len(keyed.child_a.paths)
    status, answer = raw(keyed.port, method, target, body)
    # Non-canonical paths are refused before anything else (404), and without a key
    # nothing is ever 2xx.
    assert status in (401, 404), (target, status, answer)
    assert json.loads(answer)["error"]["code"] in ("invalid_api_key", "not_found")
    assert len(keyed.child_a.paths) == before, "the request reached the model"


@pytest.mark.parametrize("target", ["/v1/chat/completions", "http://x/v1/chat/completions"])
def test_canonical_paths_without_a_key_are_401(keyed: Stack, target: str) -> None:
    status, answer = raw(keyed.port, "POST", target, CHAT)
    assert status == 401, answer
    assert json.loads(answer)["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(("method", "target"), [("GET", "/v1/models"),
                                                ("GET", "/v1/models/model-a"),
                                                ("GET", "/v2/anything"),
                                                ("GET", "/metrics"),
                                                ("POST", "/v1/unknown/route")])
def test_every_route_but_health_needs_a_key(keyed: Stack, method: str, target: str) -> None:
    status, _ = raw(keyed.port, method, target)
    assert status == 401


def test_health_is_open_and_a_key_still_works(keyed: Stack) -> None:
    assert raw(keyed.port, "GET", "/health")[0] == 200
    status, answer = raw(keyed.port, "POST", "/v1/chat/completions", CHAT,
                         {"Authorization": f"Bearer {KEY}"})
    assert status == 200, answer
