"""llmuxd with its gunicorn front end: OpenAI requests switch models; a dead front end restarts."""

from __future__ import annotations

import http.client
import json
import os
import signal
import tomllib

import psutil

from llmux_testkit.daemon import sim_model


def ask(port: int, model: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "model": model, "temperature": 0, "seed": 42, "max_tokens": 8,
            "messages": [{"role": "user", "content": "What is 2+2?"}]}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_requests_through_the_front_end_switch_models_and_it_is_restarted(make_daemon):
    d = make_daemon({"a": sim_model(sleep_level=1), "b": sim_model(sleep_level=2)},
                    frontend=True)
    port = tomllib.loads(d.config_path.read_text())["port"]
    answers = {}
    for model in ("a", "b", "a", "b"):
        status, body = ask(port, model)
        assert status == 200, body
        text = body["choices"][0]["message"]["content"]
        assert answers.setdefault(model, text) == text
    assert d.status("b")["state"] == "active" and d.status("a")["state"] == "sleeping"
    old = d.status()["daemon"]["frontend_pid"]
    assert old is not None
    os.kill(old, signal.SIGKILL)
    d.wait_for(lambda: d.status()["daemon"]["frontend_pid"] not in (None, old),
               what="a new front end")
    d.wait_for(lambda: _answers(port), timeout=60, what="the new front end to serve")
    assert d.stop() == 0
    assert not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE


def _answers(port: int) -> bool:
    try:
        return ask(port, "a")[0] == 200
    except OSError:
        return False
