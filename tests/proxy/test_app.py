"""The Falcon app through falcon.testing, against a fake daemon and fake children.

The daemon and children are real servers on real sockets (tests/proxy/standins.py);
only gunicorn is left out, so these run fast and pin the app's behaviour.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import falcon.testing
import pytest

from llmuxd.proxy.app import create_app, make_deps

from .conftest import Stack


def client(stack: Stack, **proxy: Any) -> falcon.testing.TestClient:
    config = stack.config
    if proxy:
        config = replace(config, proxy=replace(config.proxy, **proxy))
    return falcon.testing.TestClient(create_app(make_deps(config, stack.socket_path)))


def releases(stack: Stack, n: int) -> list[dict[str, Any]]:
    """The fake daemon's releases once n have arrived (they are pipelined, not awaited)."""
    deadline = time.monotonic() + 30
    while len(stack.daemon.releases) < n:
        assert time.monotonic() < deadline, f"waited for {n} releases: {stack.daemon.releases}"
        time.sleep(0.01)
    return stack.daemon.releases


def error_of(result: falcon.testing.Result) -> dict[str, Any]:
    body = result.json
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


def test_chat_is_forwarded_and_lease_released_with_outcome(stack: Stack) -> None:
    c = client(stack)
    r = c.simulate_post("/v1/chat/completions", json={"model": "model-a", "messages": []},
                        headers={"X-Request-Id": "req-123", "Connection": "x-secret",
                                 "X-Secret": "hop"})
    assert r.status_code == 200, r.text
    assert r.json["model"] == "model-a"
    assert r.json["path"] == "/v1/chat/completions"
    assert r.headers["x-request-id"] == "req-123"
    assert r.headers["x-child"] == "yes"
    assert "keep-alive" not in {k.lower() for k in r.headers}
    sent = r.json["headers"]
    assert sent["x-request-id"] == "req-123"
    assert "connection" not in sent or sent["connection"] != "x-secret"
    assert [rel["status"] for rel in releases(stack, 1)] == [200]
    release = stack.daemon.releases[0]
    assert release["bytes"] == len(r.content)
    assert release["error"] is None
    assert release["ttfb_ms"] is not None and release["duration_ms"] >= 0
    assert stack.daemon.in_flight("model-a") == 0


def test_alias_is_rewritten_to_the_served_name(stack: Stack) -> None:
    r = client(stack).simulate_post("/v1/completions", json={"model": "alias-a", "prompt": "x"})
    assert r.status_code == 200, r.text
    assert r.json["model"] == "model-a"


def test_streaming_passes_sse_through_untouched(stack: Stack) -> None:
    r = client(stack).simulate_post("/v1/chat/completions",
                                    json={"model": "model-b", "stream": True, "chunks": 5})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert len(events) == 6
    assert events[-1] == "data: [DONE]"
    assert releases(stack, 1)[0]["bytes"] == len(r.content)


def test_request_id_is_generated_when_missing_or_malformed(stack: Stack) -> None:
    c = client(stack)
    r1 = c.simulate_get("/v1/models")
    r2 = c.simulate_get("/v1/models", headers={"X-Request-Id": "bad id with spaces"})
    assert len(r1.headers["x-request-id"]) == 24
    assert r2.headers["x-request-id"] != "bad id with spaces"


@pytest.mark.parametrize(("body", "fragment"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"", "empty"),
    (b'{"messages": []}', "model parameter"),
    (b'{"model": 5}', "model parameter"),
])
def test_bad_bodies_are_400(stack: Stack, body: bytes, fragment: str) -> None:
    r = client(stack).simulate_post("/v1/chat/completions", body=body,
                                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert fragment in error_of(r)["message"]
    assert stack.daemon.releases == []


@pytest.mark.parametrize(("model", "status", "code"), [
    ("nope", 404, "model_not_found"),
    ("model-full", 429, "queue_full"),
    ("model-failed", 503, "model_failed"),
    ("model-slow", 504, "timeout"),
    ("model-gone", 502, "upstream_error"),
])
def test_lease_and_upstream_failures_map_to_openai_errors(stack: Stack, model: str,
                                                           status: int, code: str) -> None:
    r = client(stack).simulate_post("/v1/chat/completions", json={"model": model})
    assert r.status_code == status, r.text
    assert error_of(r)["code"] == code


def test_unreachable_child_releases_the_lease_with_502(stack: Stack) -> None:
    client(stack).simulate_post("/v1/chat/completions", json={"model": "model-gone"})
    assert [rel["status"] for rel in releases(stack, 1)] == [502]
    assert "refused" in stack.daemon.releases[0]["error"]


def test_model_failed_message_carries_the_reason(stack: Stack) -> None:
    r = client(stack).simulate_post("/v1/chat/completions", json={"model": "model-failed"})
    assert "exit 1" in error_of(r)["message"]


def test_body_over_the_limit_is_413(stack: Stack) -> None:
    c = client(stack, max_body_bytes=100)
    r = c.simulate_post("/v1/chat/completions", json={"model": "model-a", "x": "y" * 200})
    assert r.status_code == 413
    assert error_of(r)["code"] == "request_too_large"


@pytest.mark.parametrize("path", ["/sleep", "/wake_up", "/collective_rpc", "/is_sleeping",
                                  "/reset_prefix_cache", "/v1/load_lora_adapter",
                                  "/v1/../sleep", "/metrics", "/"])
def test_dev_and_non_api_paths_are_never_forwarded(stack: Stack, path: str) -> None:
    r = client(stack).simulate_post(path, json={"model": "model-a", "level": 1})
    assert r.status_code in (404, 405), r.text
    error_of(r)
    assert stack.child_a.paths == []


def test_api_keys_reject_missing_or_wrong_bearer_with_401(stack: Stack) -> None:
    c = client(stack, api_keys=("k1",))
    assert c.simulate_get("/v1/models").status_code == 401
    wrong = c.simulate_get("/v1/models", headers={"Authorization": "Bearer k2"})
    assert wrong.status_code == 401
    assert error_of(wrong)["type"] == "authentication_error"
    ok = c.simulate_post("/v1/chat/completions", json={"model": "model-a"},
                         headers={"Authorization": "Bearer k1"})
    assert ok.status_code == 200
    assert "authorization" not in ok.json["headers"]
    assert c.simulate_get("/health").status_code == 200


def test_models_list_has_models_aliases_and_state(stack: Stack) -> None:
    r = client(stack).simulate_get("/v1/models")
    assert r.status_code == 200
    assert r.json["object"] == "list"
    by_id = {m["id"]: m for m in r.json["data"]}
    assert by_id["model-a"]["llmux"]["state"] == "active"
    assert by_id["model-a"]["root"] == "org/model-a"
    assert by_id["alias-a"]["llmux"]["alias_of"] == "model-a"
    assert by_id["model-b"]["object"] == "model"


def test_one_model_and_unknown_model(stack: Stack) -> None:
    c = client(stack)
    assert c.simulate_get("/v1/models/alias-a").json["llmux"]["alias_of"] == "model-a"
    r = c.simulate_get("/v1/models/nope")
    assert r.status_code == 404
    assert error_of(r)["code"] == "model_not_found"


def test_health_follows_the_daemon(stack: Stack, tmp_path: Path) -> None:
    c = client(stack)
    assert c.simulate_get("/health").status_code == 200
    stack.daemon.healthy = False
    r = c.simulate_get("/health")
    assert r.status_code == 503
    assert error_of(r)["type"] == "service_unavailable_error"


def test_no_daemon_gives_503_and_models_from_config(stack: Stack, tmp_path: Path) -> None:
    c = falcon.testing.TestClient(create_app(make_deps(stack.config,
                                                       str(tmp_path / "absent.sock"))))
    r = c.simulate_post("/v1/chat/completions", json={"model": "model-a"})
    assert r.status_code == 503
    assert error_of(r)["code"] == "daemon_unavailable"
    models = c.simulate_get("/v1/models").json["data"]
    assert {m["llmux"]["state"] for m in models} == {"unknown"}


def test_unknown_route_and_method_are_openai_errors(stack: Stack) -> None:
    c = client(stack)
    assert error_of(c.simulate_get("/nowhere"))["code"] == "not_found"
    r = c.simulate_get("/v1/chat/completions")
    assert r.status_code == 405
    assert error_of(r)["code"] == "method_not_allowed"


def test_child_error_status_is_passed_through(stack: Stack) -> None:
    # The fake child answers 404 for a model it does not serve: the client sees the
    # child's own answer, and the lease records it.
    stack.daemon.models["model-b"].port = stack.child_a.port
    r = client(stack).simulate_post("/v1/chat/completions", json={"model": "model-b"})
    assert r.status_code == 404
    assert json.loads(r.text)["error"]["message"].startswith("model model-b")
    assert releases(stack, 1)[0]["status"] == 404


def test_connections_to_the_child_are_reused(stack: Stack) -> None:
    c = client(stack)
    ports = set()
    for _ in range(3):
        r = c.simulate_post("/v1/completions", json={"model": "model-a"})
        assert r.status_code == 200
        ports.add(r.json["peer_port"])
    assert len(ports) == 1, f"a new upstream connection per request: {ports}"


def test_child_closing_idle_connections_is_retried_on_a_fresh_one(stack: Stack) -> None:
    stack.child_a.hang_up_after_each = True
    c = client(stack)
    for _ in range(3):
        r = c.simulate_post("/v1/completions", json={"model": "model-a"})
        assert r.status_code == 200, r.text
    assert [rel["status"] for rel in releases(stack, 3)] == [200, 200, 200]
