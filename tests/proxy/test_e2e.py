"""End to end: a real llmuxd starts the real gunicorn front end; simulated children.

The openai client and raw sockets talk to the front end's port the way users do;
the daemon's control socket and the simulator's /metrics are used to check what
happened behind it (switches, leases, requests running in the child).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import psutil
import pytest

from llmux_testkit.daemon import DaemonProcess, sim_model
from llmuxd.config import load_config

KEY = "test-key"
FAST = ["--sim-time-scale", "0.02"]
# Starts at once, then produces 20 tokens/s at real speed: requests that last.
SLOW_TOKENS = ["--sim-load-s", "0", "--sim-warmup-s", "0", "--sim-token-rate", "20",
               "--sim-ttft-s", "0"]


class Llmux:
    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.config = load_config(daemon.config_path)
        self.port = self.config.port

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key,
                             max_retries=0, timeout=60)

    def post(self, path: str, body: Any, key: str | None = KEY, raw: bytes | None = None,
             timeout: float = 60) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            conn.request("POST", path, raw if raw is not None else json.dumps(body).encode(),
                         headers)
            resp = conn.getresponse()
            data = resp.read()
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        try:
            return resp.status, hdrs, json.loads(data)
        except ValueError:
            return resp.status, hdrs, data

    def child_port(self, model: str) -> int:
        return self.config.models[model].port

    def running_in_child(self, model: str) -> float:
        url = f"http://127.0.0.1:{self.child_port(model)}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        m = re.search(r"^vllm:num_requests_running\{[^}]*\} ([0-9.]+)", text, re.M)
        assert m, text[:500]
        return float(m.group(1))

    def leases(self) -> list[dict[str, Any]]:
        status, body = self.daemon.request("GET", "/v1/leases")
        assert status == 200, body
        return list(body["leases"])

    def gunicorn_workers(self) -> list[psutil.Process]:
        master = [p for p in psutil.Process(self.daemon.pid).children()
                  if "gunicorn" in " ".join(p.cmdline())]
        assert len(master) == 1
        return list(master[0].children())


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def llmux() -> Iterator[Llmux]:
    models = {
        "chat-a": sim_model(model_path="sim/chat-a-7b", gpu_memory_utilization=0.8,
                            sleep_level=1, aliases=["a-alias"], extra_args=FAST),
        "chat-b": sim_model(model_path="sim/chat-b-8b", gpu_memory_utilization=0.8,
                            sleep_level=2, extra_args=FAST),
        "embed": sim_model(model_path="sim/e5-embed-1b", gpu_memory_utilization=0.02,
                           extra_args=FAST),
        "streamer": sim_model(model_path="sim/streamer-1b", gpu_memory_utilization=0.02,
                              extra_args=SLOW_TOKENS),
        "victim": sim_model(model_path="sim/victim-1b", gpu_memory_utilization=0.02,
                            extra_args=SLOW_TOKENS),
        "never-ready": sim_model(model_path="sim/slow-1b", gpu_memory_utilization=0.02,
                                 extra_args=[*FAST, "--sim-fault", "never_healthy"]),
        "waits": sim_model(model_path="sim/waits-1b", gpu_memory_utilization=0.02,
                           extra_args=[*FAST, "--sim-fault", "never_healthy"]),
        "broken": sim_model(model_path="sim/broken-1b", gpu_memory_utilization=0.02,
                            extra_args=[*FAST, "--sim-fault", "crash_at_start"]),
    }
    config = {"proxy": {"host": "127.0.0.1", "workers": 2, "threads": 16,
                        "api_keys": [KEY], "max_body_bytes": 65536},
              "policy": {"request_timeout_secs": 8.0},
              # warmup off: the daemon's warm-up is a completion, which the
              # embedding model answers with 404 (reported to the daemon's owner).
              "daemon": {"max_queue_per_model": 3, "max_start_failures": 1,
                         "startup_timeout_secs": 120.0, "warmup": False}}
    with DaemonProcess(models, config=config, frontend=True, log_level="info") as daemon:
        lx = Llmux(daemon)

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{lx.port}/health",
                                            timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(healthy, 60, "the front end to answer /health")
        yield lx


# ---------------------------------------------------------------------------
# The openai client


def test_openai_client_chat_completions_embeddings_models_with_switches(llmux: Llmux) -> None:
    client = llmux.client()
    ids = {m.id for m in client.models.list()}
    assert {"chat-a", "a-alias", "chat-b", "embed"} <= ids
    assert client.models.retrieve("a-alias").id == "a-alias"

    chat = client.chat.completions.create(
        model="a-alias", messages=[{"role": "user", "content": "Hello"}], max_tokens=5)
    assert chat.model == "chat-a"
    assert chat.choices[0].message.content
    assert llmux.daemon.status("chat-a")["state"] == "active"

    # chat-b needs the GPU chat-a holds: this request switches.
    comp = client.completions.create(model="chat-b", prompt="Once", max_tokens=5)
    assert comp.choices[0].text
    assert llmux.daemon.status("chat-b")["state"] == "active"
    assert llmux.daemon.status("chat-a")["state"] == "sleeping"

    emb = client.embeddings.create(model="embed", input=["one", "two"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0

    # Streaming on chat-a switches back (L1 wake).
    stream = client.chat.completions.create(
        model="chat-a", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
        stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces).strip()
    assert llmux.daemon.status("chat-a")["state"] == "active"
    assert llmux.daemon.status("chat-b")["state"] == "sleeping"
    switch = llmux.daemon.status("chat-a")["last_switch"]
    assert switch and switch["to"] == "chat-a"


def test_openai_error_classes_404_400_401(llmux: Llmux) -> None:
    client = llmux.client()
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "x"}])
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        llmux.client(key="wrong").models.list()


# ---------------------------------------------------------------------------
# Every error status through real gunicorn


def test_400_invalid_json_and_missing_model(llmux: Llmux) -> None:
    status, _, body = llmux.post("/v1/chat/completions", None, raw=b"{nope")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, _, body = llmux.post("/v1/chat/completions", {"messages": []})
    assert status == 400 and body["error"]["param"] == "model"


def test_401_without_key(llmux: Llmux) -> None:
    status, _, body = llmux.post("/v1/chat/completions", {"model": "chat-a"}, key=None)
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"


def test_404_unknown_model_and_dev_paths(llmux: Llmux) -> None:
    status, _, body = llmux.post("/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    for path in ("/sleep?level=1", "/wake_up", "/collective_rpc", "/is_sleeping"):
        status, _, body = llmux.post(path, {"model": "chat-a"})
        assert status == 404, path
        assert "error" in body


def test_413_body_too_large(llmux: Llmux) -> None:
    status, _, body = llmux.post("/v1/completions",
                                 {"model": "chat-a", "prompt": "x" * 100_000})
    assert status == 413
    assert body["error"]["code"] == "request_too_large"


def test_503_model_failed_carries_the_reason(llmux: Llmux) -> None:
    status, headers, body = llmux.post("/v1/completions", {"model": "broken", "prompt": "x"})
    assert status == 503, body
    assert body["error"]["code"] == "model_failed"
    assert body["error"]["message"]
    assert "x-request-id" in headers


def test_429_queue_full_and_504_timeout(llmux: Llmux) -> None:
    # never-ready never becomes healthy: its queue (max 3) fills, the rest are refused
    # at once, and the waiters time out after request_timeout_secs.
    def one(_: int) -> tuple[int, dict[str, Any]]:
        status, _, body = llmux.post("/v1/completions", {"model": "never-ready",
                                                         "prompt": "x"})
        return status, body

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    statuses = sorted(s for s, _ in results)
    assert 429 in statuses, results
    assert 504 in statuses, results
    assert set(statuses) <= {429, 504}, results
    codes = {b["error"]["code"] for _, b in results}
    assert codes == {"queue_full", "timeout"}


def test_502_child_killed_mid_request(llmux: Llmux) -> None:
    status, _, _ = llmux.post("/v1/completions", {"model": "victim", "prompt": "x",
                                                  "max_tokens": 1})
    assert status == 200
    result: dict[str, Any] = {}

    def long_request() -> None:
        result["answer"] = llmux.post("/v1/completions",
                                      {"model": "victim", "prompt": "x", "max_tokens": 400,
                                       "ignore_eos": True})

    t = threading.Thread(target=long_request)
    t.start()
    wait_for(lambda: llmux.running_in_child("victim") == 1, 30, "the request in the child")
    pid = llmux.daemon.status("victim")["pid"]
    os.killpg(pid, signal.SIGKILL)
    t.join(60)
    assert not t.is_alive()
    status, _, body = result["answer"]
    assert status == 502, body
    assert body["error"]["type"] == "upstream_error"
    wait_for(lambda: not [x for x in llmux.leases() if x["model"] == "victim"], 30,
             "the victim's lease to end")


# ---------------------------------------------------------------------------
# Disconnects and a killed worker


def _start_stream(llmux: Llmux, model: str) -> socket.socket:
    body = json.dumps({"model": model, "prompt": "x", "max_tokens": 2000, "stream": True,
                       "ignore_eos": True})
    sock = socket.create_connection(("127.0.0.1", llmux.port), timeout=30)
    sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}"
                  f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  f"{body}").encode())
    assert b"200 OK" in sock.recv(65536)
    return sock


def test_client_disconnect_mid_stream_ends_the_request_in_the_child(llmux: Llmux) -> None:
    sock = _start_stream(llmux, "streamer")
    wait_for(lambda: llmux.running_in_child("streamer") == 1, 30, "the stream in the child")
    assert llmux.daemon.status("streamer")["in_flight"] == 1
    sock.close()
    wait_for(lambda: llmux.running_in_child("streamer") == 0, 30,
             "the child to see the request end")
    wait_for(lambda: llmux.daemon.status("streamer")["in_flight"] == 0, 30,
             "in-flight back to 0")
    assert not [x for x in llmux.leases() if x["model"] == "streamer"]


def test_kill9_worker_lease_reclaimed_and_serving_goes_on(llmux: Llmux) -> None:
    sock = _start_stream(llmux, "streamer")
    try:
        leases = wait_for(lambda: [x for x in llmux.leases() if x["model"] == "streamer"],
                          30, "the stream's lease")
        holder = leases[0]["pid"]
        assert holder in [w.pid for w in llmux.gunicorn_workers()]
        os.kill(holder, signal.SIGKILL)
        wait_for(lambda: llmux.daemon.status("streamer")["in_flight"] == 0, 30,
                 "the daemon to reclaim the dead worker's lease")
        assert not [x for x in llmux.leases() if x["pid"] == holder]
    finally:
        sock.close()
    wait_for(lambda: llmux.running_in_child("streamer") == 0, 30,
             "the child to see the request end")

    def serves() -> bool:
        try:
            return llmux.post("/v1/completions", {"model": "chat-a", "prompt": "x",
                                                  "max_tokens": 2})[0] == 200
        except OSError:
            return False

    wait_for(serves, 60, "the front end to serve again")
    assert len(llmux.gunicorn_workers()) == 2


def test_client_hanging_up_while_waiting_leaves_the_queue(llmux: Llmux) -> None:
    # "waits" never becomes active, so the request waits for its lease; when the
    # client hangs up, the front end drops the wait and the daemon's queue empties
    # (long before request_timeout_secs, 8 s, would have).
    def queued() -> int:
        return int(llmux.daemon.status("waits")["queued"])

    wait_for(lambda: queued() == 0, 30, "no earlier waiters")
    body = json.dumps({"model": "waits", "prompt": "x"})
    sock = socket.create_connection(("127.0.0.1", llmux.port), timeout=30)
    sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}"
                  f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  f"{body}").encode())
    wait_for(lambda: queued() == 1, 30, "the request to wait in the queue")
    sock.close()
    wait_for(lambda: queued() == 0, 5, "the waiter to leave the queue")
