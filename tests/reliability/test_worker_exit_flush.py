"""A stopping front-end worker hands over what it held back (real llmuxd, real gunicorn).

A worker holds back the lines nobody waits for: lease notices and releases under a
standing grant (llmuxd/proxy/lease_client.py) and request log lines
(llmuxd/proxy/logs.py), up to ``LLMUX_LAZY_FLUSH_SECS`` (20 ms by default). Here the
delay is an hour, so the only way those lines can reach llmuxd and the log is the
flush at the end of the worker's server shutdown (``FlushingServer`` calls the app's
``flush_held``): gunicorn's master is sent SIGTERM, and llmuxd must then have counted
every request as ended and the log must carry every request's line. Before that
flush moved into the shutdown, uvicorn's re-raised SIGTERM ended the worker first
and the lines were lost.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import tomllib
import urllib.request

from llmux_testkit.daemon import free_port, sim_model

REQUESTS = 5


def _ended(metrics_port: int, model: str) -> float:
    """llmuxd's count of ended requests of ``model`` (all statuses)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        page = r.read().decode()
    label = re.escape(f'model="{model}"')
    pattern = re.compile(r'^llmux_requests_total\{' + label + r',status="[^"]*"\} (\S+)$',
                         re.M)
    return sum(float(v) for v in pattern.findall(page))


def _logged(d, ids: list[str]) -> set[str]:
    return {e["request_id"] for e in d.log_events("request")} & set(ids)


def test_a_stopping_worker_writes_the_lease_and_log_lines_it_held_back(make_daemon):
    metrics_port = free_port()
    d = make_daemon({"m": sim_model(sleep_level=1)}, frontend=True, log_level="info",
                    config={"metrics_port": metrics_port, "proxy": {"workers": 1}},
                    env={"LLMUX_LAZY_FLUSH_SECS": "3600"})
    port = int(tomllib.loads(d.config_path.read_text())["port"])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def chat() -> str:
        conn.request("POST", "/v1/chat/completions",
                     json.dumps({"model": "m", "max_tokens": 2,
                                 "messages": [{"role": "user", "content": "hi"}]}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
        return resp.getheader("x-request-id") or ""

    # The first request started the model: its lease came after a wait, without a
    # standing grant, so its release leaves at once.
    chat()
    d.wait_for(lambda: _ended(metrics_port, "m") == 1, 30, "the first release")
    ids = [chat() for _ in range(REQUESTS)]
    conn.close()
    # The next took a lease with a standing grant; its release and the other
    # requests' lines are held back for the hour, as are the log lines. Nothing can
    # have sent them yet: no line anyone waits for was written since.
    assert _ended(metrics_port, "m") == 1
    assert _logged(d, ids) == set()

    pid = d.status()["daemon"]["frontend_pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGTERM)
    d.wait_for(lambda: _ended(metrics_port, "m") == 1 + REQUESTS, 30,
               f"llmuxd to count the {REQUESTS} requests as ended")
    d.wait_for(lambda: _logged(d, ids) == set(ids), 30, "every request's log line")
    status = d.status("m")
    assert status["in_flight"] == 0, status
