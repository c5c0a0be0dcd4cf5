"""GET /v1/models/{model}/ready end to end: real llmuxd, real front end, simulated children.

Written against the HTTP contract only (docs/interfaces.md, "Per-model readiness"),
so it holds for any front end that implements it: 200 + ``active`` when ACTIVE,
503 + the state otherwise, 404 in the OpenAI error shape for an unknown name, no
API key needed, '/' in names (raw or percent-encoded), no lease taken and nothing
woken by checking, and a state no older than about a second.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from llmux_testkit.daemon import DaemonProcess, free_port, sim_model

from .fleet_kit import KEY, http_status, request, wait_until

FAST = ["--sim-time-scale", "0.02"]


def model(path: str, **extra: Any) -> dict[str, Any]:
    return sim_model(model_path=path, gpu_memory_utilization=0.6, sleep_level=1,
                     extra_args=FAST, **extra)


@pytest.fixture(scope="module")
def box() -> Iterator[tuple[DaemonProcess, int]]:
    port = free_port()
    config = {"port": port,
              "proxy": {"host": "127.0.0.1", "workers": 2, "threads": 8, "api_keys": [KEY]},
              "daemon": {"warmup": False}}
    models = {"a": model("sim/a-1b", aliases=["org/a-1"]), "b": model("sim/b-1b")}
    with DaemonProcess(models, config=config, frontend=True, log_level="info") as d:
        wait_until(lambda: http_status(port, "/health") == 200, 60, "the front end")
        yield d, port


def ready(port: int, name: str, method: str = "GET") -> tuple[int, Any]:
    status, _, body = request(port, method, f"/v1/models/{name}/ready", key=None)
    return status, (json.loads(body) if body else None)


def settles(port: int, name: str, want: tuple[int, dict[str, Any]]) -> None:
    """The answer reaches ``want`` within a few seconds (the cache is at most ~1 s old)."""
    wait_until(lambda: ready(port, name) == want, 10, f"{name} to read {want}")


def test_states_are_200_only_when_active(box: tuple[DaemonProcess, int]) -> None:
    d, port = box
    assert d.status("a")["state"] == "stopped"
    settles(port, "a", (503, {"model": "a", "state": "stopped", "ready": False}))

    d.request("POST", "/v1/models/a/start")
    d.wait_state("a", "active")
    settles(port, "a", (200, {"model": "a", "state": "active", "ready": True}))

    d.request("POST", "/v1/models/b/switch")
    d.wait_state("b", "active")
    settles(port, "a", (503, {"model": "a", "state": "sleeping", "ready": False}))
    settles(port, "b", (200, {"model": "b", "state": "active", "ready": True}))


def test_checks_take_no_lease_and_wake_nothing(box: tuple[DaemonProcess, int]) -> None:
    d, port = box
    d.request("POST", "/v1/models/b/switch")
    d.wait_state("b", "active")
    # Each worker has its own cache: wait until every worker has caught up.
    wait_until(lambda: all(ready(port, "a")[0] == 503 for _ in range(8)), 10,
               "every worker to see a asleep")
    for _ in range(30):
        assert ready(port, "a")[0] == 503
    assert d.status("a")["state"] == "sleeping"
    assert d.request("GET", "/v1/leases")[1]["leases"] == []


def test_aliases_and_names_with_a_slash(box: tuple[DaemonProcess, int]) -> None:
    d, port = box
    d.request("POST", "/v1/models/a/switch")
    d.wait_state("a", "active")
    settles(port, "org/a-1", (200, {"model": "org/a-1", "state": "active", "ready": True}))
    # Two workers, two caches: each may lag the other by up to a second.
    settles(port, "org%2Fa-1", (200, {"model": "org/a-1", "state": "active", "ready": True}))
    wait_until(lambda: ready(port, "org/a-1", "HEAD")[0] == 200, 10, "HEAD to say 200")


def test_unknown_model_is_404_in_the_openai_shape(box: tuple[DaemonProcess, int]) -> None:
    _, port = box
    status, body = ready(port, "nope")
    assert status == 404
    assert set(body) == {"error"}
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["type"] == "invalid_request_error"


def test_the_rest_of_v1_still_needs_the_key(box: tuple[DaemonProcess, int]) -> None:
    _, port = box
    assert request(port, "GET", "/v1/models/a", key=None)[0] == 401
    assert request(port, "GET", "/v1/models/a")[0] == 200
