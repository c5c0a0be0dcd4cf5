"""A client that stops reading a stream cannot hold a model: real llmuxd, real front
end, simulated children.

Two models that cannot share the GPU: a stream on one whose client never reads
must not keep the switch to the other waiting. On the threaded front end the
stream's thread (and its lease) stayed for as long as the socket was open, so the
switch waited the full drain timeout and requests for the other model got 504s.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from llmux_testkit.daemon import DaemonProcess, sim_model
from llmuxd.config import load_config

FAST_STREAM = ["--sim-token-rate", "100000", "--sim-ttft-s", "0", "--sim-load-s", "0",
               "--sim-warmup-s", "0", "--max-model-len", "70000"]


@pytest.fixture(scope="module")
def llmux() -> Iterator[tuple[DaemonProcess, int]]:
    models = {
        "big-a": sim_model(model_path="sim/big-a-7b", gpu_memory_utilization=0.8,
                           sleep_level=1, extra_args=FAST_STREAM),
        "big-b": sim_model(model_path="sim/big-b-8b", gpu_memory_utilization=0.8,
                           sleep_level=1, extra_args=FAST_STREAM),
    }
    config = {"proxy": {"host": "127.0.0.1", "workers": 1, "client_write_timeout_secs": 1.0},
              # Longer than the request timeout: a drain that waits for the stalled
              # stream's lease makes the request for big-b time out.
              "policy": {"request_timeout_secs": 30.0},
              "daemon": {"drain_timeout_secs": 120.0, "warmup": False,
                         "startup_timeout_secs": 120.0}}
    with DaemonProcess(models, config=config, frontend=True, log_level="info") as daemon:
        port = load_config(daemon.config_path).port
        deadline = time.monotonic() + 60
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the front end did not come up"
            time.sleep(0.1)
        yield daemon, port


def post(port: int, body: dict[str, Any], timeout: float = 60) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def leases(daemon: DaemonProcess) -> list[dict[str, Any]]:
    status, body = daemon.request("GET", "/v1/leases")
    assert status == 200, body
    return list(body["leases"])


def test_stalled_stream_releases_its_lease_and_the_switch_happens(
        llmux: tuple[DaemonProcess, int]) -> None:
    daemon, port = llmux
    assert post(port, {"model": "big-a", "prompt": "hi", "max_tokens": 1})[0] == 200
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    body = json.dumps({"model": "big-a", "prompt": "hi", "max_tokens": 60000, "stream": True,
                       "ignore_eos": True})
    sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  f"{body}").encode())
    try:
        assert b" 200 " in sock.recv(256)  # the stream started; now we stop reading
        deadline = time.monotonic() + 60
        while not any(lease["model"] == "big-a" for lease in leases(daemon)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # The worker drops the reader after client_write_timeout_secs (1 s) of not
        # reading, which releases the lease: well before the stream could end.
        while any(lease["model"] == "big-a" for lease in leases(daemon)):
            assert time.monotonic() < deadline, "the stalled stream kept its lease"
            time.sleep(0.05)
        # And so the other model can take the GPU, with the socket still open.
        status, answer = post(port, {"model": "big-b", "prompt": "hi", "max_tokens": 1})
        assert status == 200, answer
        assert daemon.status("big-b")["state"] == "active"
    finally:
        sock.close()
