"""Requests still running when a front-end worker must stop end cleanly (real gunicorn).

gunicorn gives its workers ``graceful_timeout`` to finish after SIGTERM (a reload that
restarts them, a front-end restart), then kills them. It was 30 s, and a request
killed that way left no log line, no outcome in llmuxd, and a reset connection for
its client. Now it is ``[proxy] graceful_timeout_secs`` (by default as long as a
request may run, so a reload cuts none short), and shortly before it runs out the
worker ends what is still running itself: a stream gets an SSE error event and is
cut, a request still waiting for its model gets a 503 in the OpenAI shape (retry),
each gets its log line, and llmuxd counts the stream as ended.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import tomllib
from typing import Any

from llmux_testkit.daemon import free_port, sim_model

from .test_worker_exit_flush import _ended

GRACE = 3.0


def _post(port: int, body: dict[str, Any]) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    return conn.getresponse()


def test_a_stopping_worker_cuts_its_requests_short_cleanly(make_daemon):
    metrics_port = free_port()
    # "slow" streams one token per 0.1 s for minutes; "late" takes a minute to load,
    # so a request for it waits for its lease (real time: the suite's time scale off).
    real_time = ["--sim-time-scale", "1", "--sim-warmup-s", "0"]
    d = make_daemon(
        {"slow": sim_model(gpu_memory_utilization=0.3, extra_args=[
            *real_time, "--sim-load-s", "0", "--sim-token-rate", "10", "--sim-ttft-s", "0"]),
         "late": sim_model(gpu_memory_utilization=0.3,
                           extra_args=[*real_time, "--sim-load-s", "60"])},
        frontend=True, log_level="info",
        config={"metrics_port": metrics_port,
                "proxy": {"workers": 1, "graceful_timeout_secs": GRACE},
                "daemon": {"startup_timeout_secs": 120.0},
                "policy": {"request_timeout_secs": 120.0}})
    port = int(tomllib.loads(d.config_path.read_text())["port"])

    stream = _post(port, {"model": "slow", "stream": True, "max_tokens": 5000,
                          "ignore_eos": True, "messages": [{"role": "user", "content": "go"}]})
    assert stream.status == 200
    stream_id = stream.getheader("x-request-id")
    assert stream.fp is not None
    first = stream.fp.readline()
    assert first, "no first chunk"

    waiting: dict[str, Any] = {}

    def wait_for_late() -> None:
        resp = _post(port, {"model": "late", "max_tokens": 2,
                            "messages": [{"role": "user", "content": "hi"}]})
        waiting.update(status=resp.status, id=resp.getheader("x-request-id"),
                       retry=resp.getheader("retry-after"), body=resp.read())

    waiter = threading.Thread(target=wait_for_late, daemon=True)
    waiter.start()
    d.wait_for(lambda: (lambda s: s["state"] == "starting" and s["queued"] >= 1)(
        d.status("late")), 30, "the request for late to wait while late loads")

    pid = d.status()["daemon"]["frontend_pid"]
    os.kill(pid, signal.SIGTERM)

    # The stream ends with the worker's error event (gunicorn's kill would end it with
    # none, when the grace is over).
    rest = stream.fp.read()  # to the end of the connection
    events = [line for line in rest.split(b"\n") if line.startswith(b"data: ")]
    assert events and b"frontend_stopping" in events[-1], rest[-500:]

    waiter.join(GRACE + 5.0)
    assert not waiter.is_alive(), "the waiting request got no answer"
    assert waiting["status"] == 503, waiting
    error = json.loads(waiting["body"])["error"]
    assert error["code"] == "frontend_stopping" and waiting["retry"] == "1", waiting

    # Both requests have their log line, with the reason; llmuxd counted the stream.
    def logged() -> dict[str, dict[str, Any]]:
        return {e["request_id"]: e for e in d.log_events("request")
                if e.get("request_id") in (stream_id, waiting["id"])}

    lines = d.wait_for(lambda: (lambda got: got if len(got) == 2 else None)(logged()), 30,
                       "both log lines")
    assert lines[stream_id]["error"] == "front end stopping", lines[stream_id]
    assert lines[waiting["id"]]["status"] == 503, lines[waiting["id"]]
    d.wait_for(lambda: _ended(metrics_port, "slow") >= 1, 30, "llmuxd to count the stream")
    assert d.status("slow")["in_flight"] == 0
    # Ended by the app, not crashed: uvicorn logged no exception for them.
    assert "Exception in ASGI application" not in d.output()


def test_a_reload_lets_old_workers_run_their_streams_to_the_grace(make_daemon):
    """A reload through llmuxd restarts the workers; the old one keeps its stream
    until ``graceful_timeout_secs`` (8 s here), then ends it with its own error event.
    Before, gunicorn's 30 s grace ran out first and the stream was killed with the
    worker, with no event (the read here then times out). gunicorn must not report
    the old worker as hung meanwhile (its heartbeat while it stops: unit test in
    tests/proxy/test_gunicorn.py)."""
    real_time = ["--sim-time-scale", "1", "--sim-warmup-s", "0", "--sim-load-s", "0"]
    d = make_daemon(
        {"slow": sim_model(extra_args=[*real_time, "--sim-token-rate", "10",
                                       "--sim-ttft-s", "0"])},
        frontend=True, log_level="info",
        config={"proxy": {"workers": 1, "graceful_timeout_secs": 8.0}})
    port = int(tomllib.loads(d.config_path.read_text())["port"])
    stream = _post(port, {"model": "slow", "stream": True, "max_tokens": 5000,
                          "ignore_eos": True, "messages": [{"role": "user", "content": "go"}]})
    assert stream.status == 200 and stream.fp is not None
    assert stream.fp.readline()
    # A reload restarts the workers (gunicorn's master stays, and watches them).
    code, body = d.request("POST", "/v1/reload", {})
    assert code == 200, body
    rest = stream.fp.read()
    events = [line for line in rest.split(b"\n") if line.startswith(b"data: ")]
    assert events and b"frontend_stopping" in events[-1], rest[-500:]
    assert "WORKER TIMEOUT" not in d.output()
