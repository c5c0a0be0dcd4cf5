"""GET /v1/models/{model}/ready: the state cache (fake clock) and the resource (fake daemon).

The end-to-end proof through real gunicorn and a real llmuxd is in
tests/fleet/test_readiness_e2e.py; these pin the cache's refresh rules and the
resource's answers, fast.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import falcon.testing

from llmuxd.proxy.app import create_app, make_deps
from llmuxd.proxy.lease_client import DaemonUnavailable
from llmuxd.proxy.readiness import StateCache, is_ready_path

from .conftest import Stack

KEYED = 'api_keys = ["k1"]'


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def status(**states: str) -> dict[str, Any]:
    return {"models": {name: {"state": st, "aliases": [f"{name}-alias"]}
                       for name, st in states.items()}}


class Fetch:
    """A status source that counts its calls and can be made to fail."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = body
        self.calls = 0
        self.down = False

    def __call__(self) -> Mapping[str, Any]:
        self.calls += 1
        if self.down:
            raise DaemonUnavailable("connection refused")
        return self.body


def test_cache_asks_the_daemon_at_most_once_per_max_age() -> None:
    clock, fetch = Clock(), Fetch(status(a="active", b="sleeping"))
    cache = StateCache(fetch, ["a", "b"], max_age=1.0, clock=clock)
    for _ in range(50):
        assert cache.lookup("a") is not None
    assert fetch.calls == 1
    clock.now += 0.999
    cache.lookup("b")
    assert fetch.calls == 1
    clock.now += 0.002
    cache.lookup("b")
    assert fetch.calls == 2


def test_cache_sees_a_state_change_after_max_age() -> None:
    clock, fetch = Clock(), Fetch(status(a="active"))
    cache = StateCache(fetch, ["a"], max_age=1.0, clock=clock)
    found = cache.lookup("a")
    assert found is not None and found.ready
    fetch.body = status(a="sleeping")
    clock.now += 1.0
    found = cache.lookup("a")
    assert found is not None and (found.state, found.ready) == ("sleeping", False)


def test_cache_resolves_aliases_and_knows_unknown_names() -> None:
    cache = StateCache(Fetch(status(a="active")), ["a"], clock=Clock())
    found = cache.lookup("a-alias")
    assert found is not None and found.body() == {"model": "a-alias", "state": "active",
                                                  "ready": True}
    assert cache.lookup("nope") is None


def test_cache_with_the_daemon_down_says_unavailable_and_asks_once_per_max_age() -> None:
    clock, fetch = Clock(), Fetch(status(a="active"))
    fetch.down = True
    cache = StateCache(fetch, ["a"], max_age=1.0, clock=clock)
    for _ in range(20):
        found = cache.lookup("a")
        assert found is not None and (found.state, found.ready) == ("unavailable", False)
    assert cache.lookup("nope") is None
    assert fetch.calls == 1
    fetch.down = False
    clock.now += 1.0
    found = cache.lookup("a")
    assert found is not None and found.ready


def test_concurrent_checks_share_one_refresh() -> None:
    gate = threading.Event()
    entered = threading.Event()
    calls = []

    def slow_fetch() -> Mapping[str, Any]:
        calls.append(1)
        entered.set()
        assert gate.wait(30)
        return status(a="active")

    cache = StateCache(slow_fetch, ["a"], max_age=60.0)
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(cache.lookup("a")))
               for _ in range(8)]
    threads[0].start()
    assert entered.wait(30)
    for t in threads[1:]:
        t.start()
    gate.set()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert len(calls) == 1
    assert len(results) == 8 and all(r is not None and r.ready for r in results)


def test_ready_paths() -> None:
    assert is_ready_path("/v1/models/a/ready")
    assert is_ready_path("/v1/models/Qwen/Qwen3-14B/ready")
    assert not is_ready_path("/v1/models/ready")
    assert not is_ready_path("/v1/models/a")
    assert not is_ready_path("/v1/chat/completions")


# -- the resource, through the Falcon app and the fake daemon on its real socket --


def app_client(stack: Stack) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(make_deps(stack.config, stack.socket_path)))


def test_active_model_is_200_and_other_states_are_503(stack: Stack) -> None:
    stack.daemon.models["model-b"].state = "sleeping"
    c = app_client(stack)
    r = c.simulate_get("/v1/models/model-a/ready")
    assert r.status_code == 200
    assert r.json == {"model": "model-a", "state": "active", "ready": True}
    assert r.headers["cache-control"] == "no-store"
    r = c.simulate_get("/v1/models/model-b/ready")
    assert r.status_code == 503
    assert r.json == {"model": "model-b", "state": "sleeping", "ready": False}
    r = c.simulate_get("/v1/models/alias-a/ready")
    assert (r.status_code, r.json["state"]) == (200, "active")
    assert c.simulate_head("/v1/models/model-b/ready").status_code == 503


def test_unknown_model_is_404_in_the_openai_shape(stack: Stack) -> None:
    r = app_client(stack).simulate_get("/v1/models/nope/ready")
    assert r.status_code == 404
    assert r.json["error"]["code"] == "model_not_found"
    assert r.json["error"]["param"] == "model"


def test_readiness_needs_no_key_but_the_rest_of_v1_still_does(tmp_path: Any) -> None:
    with Stack(tmp_path, extra_proxy=KEYED) as stack:
        c = app_client(stack)
        assert c.simulate_get("/v1/models/model-a/ready").status_code == 200
        assert c.simulate_get("/v1/models/model-a").status_code == 401
        assert c.simulate_get("/v1/models/model-a/other").status_code == 401
        r = c.simulate_get("/v1/models/model-a", headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200


def test_daemon_down_is_503_unavailable_for_a_configured_model(stack: Stack) -> None:
    stack.daemon.healthy = False
    c = app_client(stack)
    r = c.simulate_get("/v1/models/model-a/ready")
    assert r.status_code == 503
    assert r.json == {"model": "model-a", "state": "unavailable", "ready": False}
    assert c.simulate_get("/v1/models/nope/ready").status_code == 404
