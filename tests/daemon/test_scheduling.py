"""Scheduling defects of the seed (issue 10, "Why"), end to end through the real daemon.

Each test runs a real llmuxd with simulator children at real time scale (so that
a switch lasts long enough to be seen) and shows one defect from the outside:
what a client gets, what state a model is in, what the log says. None of them
measures a duration: they wait on states and leases with deadlines.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

from llmux_testkit.daemon import DaemonProcess, sim_model

from .daemon_helpers import lease, release, upstream_post

# Real time (not 100x faster): a quick start, a slow enough switch to observe.
REAL_TIME = {"LLMUX_SIM_TIME_SCALE": "1"}


def slow_model(load_s: float = 0.3, wake_gib_s: float = 50.0, **extra: Any) -> dict[str, Any]:
    """A 10 GiB simulated model at L1: start = load_s, wake = 10 / wake_gib_s seconds."""
    args = ["--sim-size-gib", "10", "--sim-load-s", str(load_s), "--sim-warmup-s", "0",
            "--sim-h2d-gibps", str(wake_gib_s), "--sim-token-rate", "20"]
    return sim_model(sleep_level=1, gpu_memory_utilization=0.9, extra_args=args, **extra)


class Background:
    """``fn()`` in a thread; ``result(timeout)`` joins it and returns its value."""

    def __init__(self, fn: Any) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Any) -> None:
        try:
            self.value = fn()
        except BaseException as exc:   # reported by result()
            self.error = exc

    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self, timeout: float = 60.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background call did not finish in time"
        if self.error is not None:
            raise self.error
        return self.value


def activations(d: DaemonProcess, model: str) -> int:
    return len([e for e in d.log_events("transition")
                if e["model"] == model and e["to_state"] == "active"])


def long_chat(grant: dict[str, Any], tokens: int = 40) -> dict[str, Any]:
    """A completion of exactly ``tokens`` tokens (2 s at 20 tokens/s), unless cut short."""
    status, body = upstream_post(grant["upstream"], "/v1/chat/completions", {
        "model": grant["served_model_name"], "max_tokens": tokens, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Tell me a long story."}]}, timeout=60)
    assert status == 200, body
    return dict(body)


def test_a_switch_serves_more_than_the_one_batch_that_was_waiting(make_daemon):
    """Seed: with min_active_secs = 0 a model that just became active was told to leave
    in the same loop pass (another model waited): each switch served exactly the batch
    that had been waiting, and a request arriving a moment later queued behind two more
    switches. Now a model stays at least as long as the switch into it took."""
    d = make_daemon({"a": slow_model(), "b": slow_model(load_s=3.0)}, env=REAL_TIME)
    code, la = lease(d, "a")
    assert code == 200, la
    wait_b = Background(lambda: lease(d, "b"))
    d.wait_state("a", "draining")
    wait_a = Background(lambda: lease(d, "a"))          # a waits again while b comes
    d.wait_for(lambda: d.status("a")["queued"] == 1, 30, "a's second waiter")
    release(d, la["lease_id"])
    code, lb = wait_b.result(60)                        # b's batch, granted as b came
    assert code == 200, lb
    assert d.status("a")["queued"] == 1                 # a still waits: contention
    second_b = Background(lambda: lease(d, "b"))
    d.wait_for(lambda: second_b.done() or d.status("b")["state"] != "active", 30,
               "b's second lease or b leaving")
    assert second_b.done(), "b was made to leave at once: its second request had to queue"
    code, lb2 = second_b.result()
    assert code == 200 and not lb2["switched"], lb2
    assert activations(d, "b") == 1
    release(d, lb["lease_id"])
    release(d, lb2["lease_id"])
    code, la2 = wait_a.result(60)                       # and a is not starved
    assert code == 200, la2
    release(d, la2["lease_id"])


def test_without_drain_a_request_longer_than_a_tick_still_completes(make_daemon):
    """Seed: drain_before_switch = false with min_active_secs = 0 put a model to sleep
    one pass after its batch was granted, under its leases: a request longer than a
    loop tick was aborted (vLLM aborts in-flight requests on /sleep), every time."""
    d = make_daemon({"a": slow_model(), "b": slow_model()}, env=REAL_TIME,
                    config={"policy": {"drain_before_switch": False,
                                       "min_active_secs": 0}})
    code, la = lease(d, "a")
    assert code == 200, la
    story = Background(lambda: long_chat(la))
    d.wait_for(lambda: _running(la) >= 1, 30, "a's request to be generating")
    wait_b = Background(lambda: lease(d, "b"))
    body = story.result(60)
    assert body["choices"][0]["finish_reason"] == "length", body
    assert body["usage"]["completion_tokens"] == 40
    release(d, la["lease_id"])
    code, lb = wait_b.result(60)
    assert code == 200, lb
    release(d, lb["lease_id"])


def _running(grant: dict[str, Any]) -> int:
    """Requests the child is generating right now (vLLM's num_requests_running)."""
    import http.client
    host, port = grant["upstream"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def test_a_drain_does_not_outlast_the_requests_it_makes_room_for(make_daemon):
    """Seed: drain_timeout_secs = request_timeout_secs (both 60 s). A long request on
    the active model held the drain until the waiters of the other model timed out,
    at the very moment the drain gave up: they got 504, and the drained model was put
    to sleep for nobody (switch "abandoned"). The waiting requests' timeout wins: a
    drain ends in time for the switch to finish before they time out."""
    d = make_daemon({"a": slow_model(), "b": slow_model()}, env=REAL_TIME,
                    config={"policy": {"request_timeout_secs": 6.0},
                            "daemon": {"drain_timeout_secs": 6.0}})
    code, la = lease(d, "a")                            # a long request, never released
    assert code == 200, la
    code, lb = lease(d, "b")
    assert code == 200, lb                              # seed: 504 after 6 s
    assert d.status("a")["state"] == "sleeping"
    switch = d.status("b")["last_switch"]
    assert (switch["from"], switch["to"], switch["result"]) == ("a", "b", "ok")
    assert not [e for e in d.log_events("switch") if e["result"] == "abandoned"]
    release(d, lb["lease_id"])


def test_a_drain_whose_waiters_left_is_cancelled(make_daemon):
    """Seed: once a drain began, the model was put to sleep when it ended even if
    every request it made room for had gone (client disconnected, timed out): a sleep
    and a wake for nobody. Now the drain is called off and the model serves again."""
    d = make_daemon({"a": slow_model(), "b": slow_model()}, env=REAL_TIME,
                    config={"daemon": {"drain_timeout_secs": 30.0}})
    code, la = lease(d, "a")
    assert code == 200, la
    gone = _raw_lease_request(d, "b")                   # a client that will hang up
    d.wait_state("a", "draining")
    gone.close()
    d.wait_state("a", "active", timeout=15)             # seed: draining until 30 s
    assert d.status("b")["queued"] == 0
    code, la2 = lease(d, "a")                           # a serves again at once
    assert code == 200 and not la2["switched"], la2
    release(d, la["lease_id"])
    release(d, la2["lease_id"])
    assert not [e for e in d.log_events("transition")
                if e["model"] == "a" and e["to_state"] == "sleeping"]
    assert [e for e in d.log_events("drain_cancelled") if e["model"] == "a"]


def _raw_lease_request(d: DaemonProcess, model: str) -> socket.socket:
    """Send POST /v1/leases on a connection of our own and leave it open (no answer read)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(d.socket)
    body = json.dumps({"model": model}).encode()
    s.sendall(b"POST /v1/leases HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 10
    while d.status(model)["queued"] < 1:
        assert time.monotonic() < deadline, "the raw lease request never queued"
        time.sleep(0.05)
    return s


def _metrics(port: int) -> str:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def _ctl(d: DaemonProcess, *args: str) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("LLMUX_SOCKET", "PYTHONPATH")}
    env["PYTHONPATH"] = str(repo)
    r = subprocess.run([sys.executable, "-m", "llmuxctl", "-s", d.socket, *args], cwd=repo,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_status_and_metrics_say_who_waits_why_and_for_how_long(make_daemon):
    """llmuxctl status, /v1/status and /metrics: the policy, per model the quantum left,
    the waiting requests and why they wait, and the idle time of an active model."""
    from llmux_testkit.daemon import free_port
    mport = free_port()
    d = make_daemon({"a": slow_model(), "b": slow_model()}, env=REAL_TIME,
                    config={"metrics_port": mport, "policy": {"min_active_secs": 60}})
    code, la = lease(d, "a")
    assert code == 200, la
    release(d, la["lease_id"])
    idle1 = d.wait_for(lambda: d.status("a")["scheduling"]["idle_s"], 10, "a idle")
    idle2 = d.wait_for(lambda: (lambda s: s if s > idle1 else None)(
        d.status("a")["scheduling"]["idle_s"]), 10, "a's idle time to grow")
    assert idle2 > idle1
    wait_b = Background(lambda: lease(d, "b"))          # a keeps its 60 s minimum
    d.wait_for(lambda: d.status("b")["scheduling"]["why_waiting"], 10, "b's reason")
    status = d.status()
    assert status["daemon"]["policy"] == "fifo"
    assert status["scheduler"]["policy"] == "fifo"
    assert status["scheduler"]["options"]["max_wait_secs"] == 15.0
    assert [c for c in status["scheduler"]["switch_costs"] if c["to"] == "a"]
    a, b = status["models"]["a"]["scheduling"], status["models"]["b"]["scheduling"]
    assert 0 < a["quantum_left_s"] <= 60
    assert a["idle_s"] is not None and a["waiting"] == 0
    assert b["waiting"] == 1 and b["oldest_wait_s"] >= 0
    assert b["waiting_reason"] == "quantum"
    assert "'a' serves its quantum" in b["why_waiting"]

    out = _ctl(d, "status")
    header = out.splitlines()[0].split()
    assert "QUANTUM" in header and "IDLE" in header
    assert "policy: fifo" in out
    line = next(x for x in out.splitlines() if x.startswith("b: "))
    assert "1 waiting" in line and "'a' serves its quantum" in line
    row_a = next(x for x in out.splitlines() if x.startswith("a "))
    assert "s" in row_a.split()[7]                      # QUANTUM column: "57.3s"

    def scraped() -> str | None:
        text = _metrics(mport)
        return text if 'llmux_model_waiting_reason{model="b",reason="quantum"} 1.0' in text \
            else None
    text = d.wait_for(scraped, 10, "the scheduling metrics")
    assert 'llmux_policy_info{policy="fifo"} 1.0' in text
    assert 'llmux_model_quantum_left_seconds{model="a"}' in text
    assert 'llmux_model_oldest_wait_seconds{model="b"}' in text
    assert 'llmux_switch_cost_ema_seconds{from="",to="a"}' in text
    assert d.stop() == 0                                # b's waiter is answered (503)
    code, got = wait_b.result(30)
    assert code == 503, got


def test_the_measured_switch_cost_reaches_the_policy(make_daemon):
    """Seed: the per-direction switch-cost EMA was computed and read by no policy.
    cost_aware keeps a busy model for the cost of the switch away from it: 40 s
    while that direction is unmeasured (default_switch_secs), the measured ~0.5 s
    once the daemon has seen that switch, so the same request is served at once."""
    d = make_daemon({"a": slow_model(), "b": slow_model()}, env=REAL_TIME,
                    config={"policy": {"policy_type": "cost_aware", "default_switch_secs": 40,
                                       "max_wait_secs": 100}})
    code, la = lease(d, "a")
    assert code == 200, la
    wait_b = Background(lambda: lease(d, "b"))
    d.wait_for(lambda: d.status("b")["scheduling"]["why_waiting"], 10, "b's reason")
    a = d.status("a")
    assert a["state"] == "active" and a["scheduling"]["quantum_left_s"] > 20   # unmeasured
    release(d, la["lease_id"])                          # a idle: cost_aware switches now
    code, lb = wait_b.result(30)
    assert code == 200, lb
    release(d, lb["lease_id"])
    code, la = lease(d, "a")                            # b idle: b -> a, measured too
    assert code == 200, la
    costs = {(c["from"], c["to"]): c["secs"] for c in d.status()["scheduler"]["switch_costs"]}
    assert costs[("a", "b")] < 40 and costs[("b", "a")] < 40
    wait_b = Background(lambda: lease(d, "b"))          # a busy again, b waits
    d.wait_state("a", "draining", timeout=20)           # not after 40 s: the EMA was read
    release(d, la["lease_id"])
    code, lb = wait_b.result(30)
    assert code == 200, lb
    release(d, lb["lease_id"])
