"""Any model name vLLM accepts (Hugging Face ids with '/', dots, colons, unicode) works
everywhere: config, control API (percent-encoded), llmuxctl, status, metrics, logs, proxy."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from llmux_testkit.daemon import free_port, sim_model
from llmuxd.child import log_file_name
from llmuxd.config import ConfigError, build_config
from tests.daemon.daemon_helpers import leased_chat

NAMES = ["Qwen/Qwen3-14B", "org.x/model:v1.5", "modèle-ünïcode", "a b/c"]


def config_with(name: str) -> dict:
    return {"models": {name: {"model_path": "m", "port": free_port()}}}


@pytest.mark.parametrize("name", NAMES)
def test_config_accepts_names_vllm_accepts(name: str):
    assert list(build_config(config_with(name)).models) == [name]


@pytest.mark.parametrize("name", ["", " padded", "new\nline", "tab\there", "/leading", "x/"])
def test_config_still_refuses_unusable_names(name: str):
    with pytest.raises(ConfigError, match="model name"):
        build_config(config_with(name))


def test_log_file_names_are_safe_and_collision_free():
    names = ["a", "a_b", "a/b", "a:b", "a b", "../etc/passwd", "Qwen/Qwen3-14B",
             "modèle", "x" * 300, "x" * 301]
    files = [log_file_name(n) for n in names]
    assert len(set(files)) == len(files), files
    for f in files:
        assert "/" not in f and "\0" not in f and not f.startswith(".")
        assert f.endswith(".log") and len(f.encode()) <= 255
    assert log_file_name("a") == "a.log"          # plain names keep their old file
    assert log_file_name("Qwen/Qwen3-14B").startswith("Qwen_Qwen3-14B")


def ask_frontend(port: int, model: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "model": model, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "hi"}]}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_a_slash_name_works_through_every_interface(make_daemon):
    name = "Qwen/Qwen3-14B"
    metrics_port = free_port()
    d = make_daemon({name: sim_model(sleep_level=1), "plain": sim_model(sleep_level=1)},
                    config={"metrics_port": metrics_port}, frontend=True)
    _, grant = leased_chat(d, name)                           # control API leases
    assert grant["model"] == name and grant["served_model_name"] == name
    path = "/v1/models/" + quote(name, safe="")
    code, st = d.request("GET", path)                         # percent-encoded route
    assert code == 200 and st["name"] == name and st["state"] == "active", st
    code, logs = d.request("GET", path + "/logs?lines=5")
    assert code == 200, logs
    log_path = Path(logs["path"])
    assert log_path.parent == d.log_dir and log_path.name == log_file_name(name)
    assert log_path.exists()
    port = tomllib.loads(d.config_path.read_text())["port"]
    code, body = ask_frontend(port, name)                     # the proxy
    assert code == 200, body
    ctl = subprocess.run([sys.executable, "-m", "llmuxctl", "-s", d.socket, "--json",
                          "status", name], capture_output=True, text=True, timeout=60)
    assert ctl.returncode == 0, ctl.stderr
    assert name in ctl.stdout
    ctl = subprocess.run([sys.executable, "-m", "llmuxctl", "-s", d.socket, "sleep", name],
                         capture_output=True, text=True, timeout=60)
    assert ctl.returncode == 0, ctl.stderr
    d.wait_state(name, "sleeping")
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert f'model="{name}"' in text
