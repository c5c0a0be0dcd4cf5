"""The fleet proof: two real llmux boxes behind a real HAProxy, config by llmuxctl fleet haproxy.

``shared`` is on both boxes (same weights); ``solo1``/``solo2`` on one box each. One
model fills a box's simulated GPU, so making ``soloN`` active puts ``shared`` to
sleep there. What is shown, with each box's own /metrics as the witness:

* a request for ``shared`` goes to the box where it is awake: no switch anywhere;
* when it is awake nowhere, a burst of requests wakes it on ONE box only;
* streaming and error answers through HAProxy are the ones the box gives directly,
  and a stream's first event arrives while the child is still generating;
* when the box holding it stops, requests fail over; when it is back, it serves again.

Every wait for HAProxy's health checks is a poll of its stats socket with a deadline.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from llmux_testkit.daemon import sim_model

from .fleet_kit import KEY, Box, HAProxy, chat, needs, request

pytestmark = needs("haproxy", "haproxy")

FAST = ["--sim-time-scale", "0.02"]
# Starts at once, then 20 tokens/s at real speed: 100 tokens stream for about 5 s.
SLOW_TOKENS = ["--sim-load-s", "0", "--sim-warmup-s", "0", "--sim-token-rate", "20",
               "--sim-ttft-s", "0"]


def model(path: str) -> dict:
    return sim_model(model_path=path, gpu_memory_utilization=0.6, sleep_level=1,
                     extra_args=FAST)


class Fleet:
    def __init__(self, box1: Box, box2: Box, proxy: HAProxy) -> None:
        self.box1, self.box2, self.proxy = box1, box2, proxy
        self.boxes = {"box1": box1, "box2": box2}

    def make_active(self, box: Box, name: str) -> None:
        box.control("POST", f"/v1/models/{name}/switch")
        box.daemon.wait_state(name, "active")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    streamer = sim_model(model_path="sim/streamer-1b", gpu_memory_utilization=0.02,
                         extra_args=SLOW_TOKENS)
    box1 = Box("box1", {"shared": model("sim/shared-1b"), "solo1": model("sim/solo1-1b"),
                        "streamer": streamer}, tmp / "box1")
    box2 = Box("box2", {"shared": model("sim/shared-1b"), "solo2": model("sim/solo2-1b")},
               tmp / "box2")
    proxy = HAProxy([box1, box2], tmp)
    try:
        box1.start()
        box2.start()
        text = proxy.generate()
        assert "backend model_shared" in text and "use_backend model_solo2" in text
        proxy.start()
        yield Fleet(box1, box2, proxy)
    finally:
        proxy.stop()
        box2.daemon.__exit__()
        box1.daemon.__exit__()


def running_in_child(port: int) -> float:
    """vllm:num_requests_running of a simulated child (its own /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(r"^vllm:num_requests_running\{[^}]*\} ([0-9.]+)", text, re.M)
    assert m, text[:500]
    return float(m.group(1))


def shared_up(on: str | None) -> dict[tuple[str, str], str]:
    """HAProxy's readiness view of ``shared``: UP on box ``on`` only (None: nowhere)."""
    return {("model_shared", b): "UP" if b == on else "DOWN" for b in ("box1", "box2")}


def test_requests_go_to_the_box_where_the_model_is_awake(fleet: Fleet) -> None:
    fleet.make_active(fleet.box1, "solo1")   # shared is not awake on box1
    fleet.make_active(fleet.box2, "shared")
    fleet.proxy.wait_servers(shared_up("box2"))
    switches = {n: b.switches() for n, b in fleet.boxes.items()}
    served = {n: b.served("shared") for n, b in fleet.boxes.items()}

    for stream in (False, True, False, True, False, False):
        status, _, body = request(fleet.proxy.port, "POST", "/v1/chat/completions",
                                  chat("shared", stream))
        assert status == 200, body

    assert {n: b.switches() for n, b in fleet.boxes.items()} == switches
    fleet.box2.wait_served("shared", served["box2"] + 6)
    assert fleet.box1.served("shared") == served["box1"]
    assert fleet.box1.state("solo1") == "active"


def test_a_miss_wakes_the_model_on_one_box_only(fleet: Fleet) -> None:
    fleet.make_active(fleet.box1, "solo1")
    fleet.make_active(fleet.box2, "solo2")
    fleet.proxy.wait_servers(shared_up(None))
    switches = {n: b.switches() for n, b in fleet.boxes.items()}

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(
            lambda _: request(fleet.proxy.port, "POST", "/v1/chat/completions",
                              chat("shared")), range(4)))
    assert [a[0] for a in answers] == [200] * 4, answers

    woke = [n for n, b in fleet.boxes.items() if b.state("shared") == "active"]
    assert len(woke) == 1, woke
    after = {n: b.switches() for n, b in fleet.boxes.items()}
    assert after[woke[0]] == switches[woke[0]] + 1
    other = "box2" if woke[0] == "box1" else "box1"
    assert after[other] == switches[other]
    # Once awake there, HAProxy's readiness check makes that box the primary.
    fleet.proxy.wait_servers(shared_up(woke[0]))


def test_streaming_and_errors_are_unchanged_through_haproxy(fleet: Fleet) -> None:
    fleet.make_active(fleet.box2, "solo2")
    fleet.make_active(fleet.box1, "shared")
    fleet.proxy.wait_servers(shared_up("box1"))
    direct, via = fleet.box1.port, fleet.proxy.port

    def stream_of(port: int) -> tuple[int, str, list[str]]:
        status, headers, body = request(port, "POST", "/v1/chat/completions",
                                        chat("shared", stream=True))
        events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        pieces = []
        for e in events:
            if e == "[DONE]":
                pieces.append(e)
                continue
            for choice in json.loads(e)["choices"]:
                pieces.append(json.dumps(choice.get("delta"), sort_keys=True))
        return status, headers.get("content-type", ""), pieces

    s_direct, s_via = stream_of(direct), stream_of(via)
    assert s_direct[0] == 200 and s_direct[1].startswith("text/event-stream")
    assert s_via == s_direct
    assert s_via[2][-1] == "[DONE]" and len(s_via[2]) > 2

    cases = [
        ({"model": "no-such-model", "messages": []}, None, KEY),         # 404 from a box
        (None, b"{not json", KEY),                                      # 400
        ({"messages": []}, None, KEY),                                  # 400: no model
        (chat("shared"), None, None),                                   # 401: no key
        (chat("shared"), None, "wrong-key"),                            # 401
    ]
    for body, raw, key in cases:
        want = request(direct, "POST", "/v1/chat/completions", body, key=key, raw=raw)
        got = request(via, "POST", "/v1/chat/completions", body, key=key, raw=raw)
        assert want[0] in (400, 401, 404), want
        assert (got[0], json.loads(got[2])) == (want[0], json.loads(want[2]))
        assert got[1]["content-type"] == want[1]["content-type"]


def test_a_stream_flows_through_haproxy_while_it_is_generated(fleet: Fleet) -> None:
    """The first event arrives while the child is still generating: nothing buffers."""
    child = int(fleet.box1.daemon.models["streamer"]["port"])
    body = {"model": "streamer", "prompt": "count", "max_tokens": 100, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", fleet.proxy.port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        assert resp.status == 200
        first = resp.readline()
        while not first.startswith(b"data: "):
            first = resp.readline()
        assert running_in_child(child) == 1   # still generating the rest
        rest = resp.read().decode()
    finally:
        conn.close()
    assert rest.rstrip().endswith("data: [DONE]")
    assert rest.count("data: ") > 10


def test_failover_when_a_box_stops_and_back_when_it_returns(fleet: Fleet) -> None:
    fleet.make_active(fleet.box2, "solo2")
    fleet.make_active(fleet.box1, "shared")
    fleet.proxy.wait_servers(shared_up("box1"))

    assert fleet.box1.daemon.stop() == 0
    fleet.proxy.wait_servers({("any_box", "box1"): "DOWN", ("model_shared", "box1"): "DOWN",
                              ("model_shared", "box1-any"): "DOWN"})
    before = fleet.box2.served("shared")
    for _ in range(3):
        status, _, body = request(fleet.proxy.port, "POST", "/v1/chat/completions",
                                  chat("shared"))
        assert status == 200, body
    fleet.box2.wait_served("shared", before + 3)
    assert fleet.box2.state("shared") == "active"
    # solo1 lives on box1 only: while box1 is down HAProxy has nowhere to send it.
    status, _, _ = request(fleet.proxy.port, "POST", "/v1/chat/completions", chat("solo1"))
    assert status == 503

    fleet.box1.start()
    fleet.proxy.wait_servers({("any_box", "box1"): "UP", ("model_solo1", "box1-any"): "UP",
                              **shared_up("box2")})
    switches = {n: b.switches() for n, b in fleet.boxes.items()}
    status, _, body = request(fleet.proxy.port, "POST", "/v1/chat/completions", chat("shared"))
    assert status == 200, body
    assert {n: b.switches() for n, b in fleet.boxes.items()} == switches  # still box2's
    status, _, body = request(fleet.proxy.port, "POST", "/v1/chat/completions", chat("solo1"))
    assert status == 200, body
    fleet.box1.wait_served("solo1", 1)
