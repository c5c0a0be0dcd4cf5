"""Routes of the ASGI app (falcon.testing against the fake daemon and children):
the readiness contract, the OpenAI allow-list, the two upstream timeouts, and the
body scan that finds ``model`` without building the body's tree."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import falcon.testing
import pytest

from llmuxd.proxy import bodyscan
from llmuxd.proxy.app import OPENAI_ROUTES, create_app, make_deps

from .conftest import Stack
from .standins import FakeModel


def client(stack: Stack, **proxy: Any) -> falcon.testing.TestClient:
    config = stack.config
    if proxy:
        config = replace(config, proxy=replace(config.proxy, **proxy))
    return falcon.testing.TestClient(create_app(make_deps(config, stack.socket_path)))


# -- readiness (issue 14's contract) -----------------------------------------


def test_ready_is_200_when_active_503_with_the_state_otherwise(stack: Stack) -> None:
    stack.daemon.models["model-b"].state = "sleeping"
    c = client(stack)
    r = c.simulate_get("/v1/models/model-a/ready")
    assert r.status_code == 200
    assert r.json == {"model": "model-a", "state": "active", "ready": True}
    r = c.simulate_get("/v1/models/model-b/ready")
    assert r.status_code == 503
    assert r.json == {"model": "model-b", "state": "sleeping", "ready": False}
    r = c.simulate_get("/v1/models/alias-a/ready")
    assert r.status_code == 200 and r.json["model"] == "alias-a"


def test_ready_unknown_model_is_404_in_openai_shape(stack: Stack) -> None:
    r = client(stack).simulate_get("/v1/models/nope/ready")
    assert r.status_code == 404
    assert r.json["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("path", ["/v1/models/Qwen/Qwen3-14B/ready",
                                  "/v1/models/Qwen%2FQwen3-14B/ready"])
def test_ready_model_names_with_a_slash(stack: Stack, path: str) -> None:
    stack.daemon.models["Qwen/Qwen3-14B"] = FakeModel("Qwen/Qwen3-14B", 1, state="waking")
    r = client(stack).simulate_get(path)
    assert r.status_code == 503, r.text
    assert r.json == {"model": "Qwen/Qwen3-14B", "state": "waking", "ready": False}


def test_ready_needs_no_key_but_the_model_route_does(stack: Stack) -> None:
    c = client(stack, api_keys=("k1",))
    assert c.simulate_get("/v1/models/model-a/ready").status_code == 200
    assert c.simulate_get("/v1/models/model-a").status_code == 401
    assert c.simulate_get("/v1/models/model-a",
                          headers={"Authorization": "Bearer k1"}).status_code == 200


def test_ready_is_served_from_a_cache_at_most_a_second_old(stack: Stack) -> None:
    c = client(stack)
    assert c.simulate_get("/v1/models/model-a/ready").status_code == 200
    stack.daemon.models["model-a"].state = "sleeping"
    # Within the cache's age the old answer stands (no round trip per check)...
    assert c.simulate_get("/v1/models/model-a/ready").status_code == 200


# -- the allow-list ----------------------------------------------------------


@pytest.mark.parametrize("route", sorted(OPENAI_ROUTES))
def test_every_allowed_route_is_forwarded(stack: Stack, route: str) -> None:
    r = client(stack).simulate_post(f"/v1/{route}", json={"model": "model-a"})
    assert r.status_code == 200, r.text
    assert r.json["path"] == f"/v1/{route}"


@pytest.mark.parametrize("route", ["load_lora_adapter", "unload_lora_adapter", "chat",
                                   "chat/completions/x", "audio/transcriptions", "files",
                                   "fine_tuning/jobs", "models/model-a"])
def test_routes_outside_the_list_are_404_and_never_forwarded(stack: Stack, route: str) -> None:
    r = client(stack).simulate_post(f"/v1/{route}", json={"model": "model-a"})
    assert r.status_code in (404, 405), r.text
    assert stack.child_a.paths == []


# -- upstream timeouts -------------------------------------------------------


def test_idle_and_total_timeouts_are_distinct_504s(stack: Stack) -> None:
    idle = client(stack, upstream_idle_timeout_secs=0.3, upstream_timeout_secs=30.0)
    r = idle.simulate_post("/v1/completions", json={"model": "model-a", "stall": 2})
    assert r.status_code == 504
    assert r.json["error"]["code"] == "upstream_idle_timeout"
    total = client(stack, upstream_idle_timeout_secs=30.0, upstream_timeout_secs=0.3)
    r = total.simulate_post("/v1/completions", json={"model": "model-a", "stall": 2})
    assert r.status_code == 504
    assert r.json["error"]["code"] == "upstream_timeout"


# -- the body scan -----------------------------------------------------------


@pytest.mark.parametrize("body", [
    b'{"model": "m"}',
    b'{"messages": [{"model": "x"}], "model": "m"}',
    b'{"tools": [{"properties": {"model": {"type": "string"}}}], "model": "m", "n": {}}',
    b' {"a": {"model": "n"}, "b": [1, {"c": "]}"}], "model" : "m"} ',
    b'{"model": "x", "model": "m"}',
])
def test_scan_finds_the_top_level_model_as_json_does(body: bytes) -> None:
    assert json.loads(body)["model"] == "m"
    found = bodyscan._scan(body)
    assert found.model == "m"
    rewritten = bodyscan.rewrite(body, found, "served/name")
    assert json.loads(rewritten)["model"] == "served/name"
    assert rewritten.replace(b'"served/name"', b'"m"') == body


@pytest.mark.parametrize(("body", "fragment"), [
    (b"[1, 2]", "must be a JSON object"),
    (b'{"a": 1}', "model parameter"),
    (b'{"model": 5}', "must be a string"),
    (b'{"model": "m"', "not valid JSON"),
    (b'{"model": "m"} trailing', "not valid JSON"),
    (b'{"model": "m", "x": "open', "not valid JSON"),
])
def test_scan_refuses_bodies_without_a_usable_model(body: bytes, fragment: str) -> None:
    with pytest.raises(bodyscan.BodyError, match=fragment):
        bodyscan._scan(body)


def test_big_body_is_scanned_and_small_body_parsed_alike() -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "hi"}] * 20000,
                      "model": "m"}).encode()
    assert len(big) > bodyscan.SMALL
    assert bodyscan.find_model(big).model == "m"
    assert bodyscan.find_model(b'{"model": "m"}').model == "m"


def test_query_string_reaches_the_child_as_sent(stack: Stack) -> None:
    r = client(stack).simulate_post("/v1/completions", query_string="a=%C3%A9&b=1",
                                    json={"model": "model-a"})
    assert r.status_code == 200, r.text
    assert r.json["path"] == "/v1/completions?a=%C3%A9&b=1"
