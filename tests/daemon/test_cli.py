"""The llmuxd command line: --check-config, --version, config errors at start."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

LLMUXD = [sys.executable, "-m", "llmuxd"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LLMUXD, *args], capture_output=True, text=True, timeout=60)


GOOD = """
port = 3999
[daemon]
socket = "/tmp/x.sock"
[models.qwen]
model_path = "Qwen/Qwen3-14B"
port = 8001
sleep_level = 1
"""

BAD = """
[policy]
sleep_level = 7
[models.qwen-14b]
model_path = "x"
port = 8001
sleep_level = 5
colour = "red"
"""


def test_check_config_prints_the_resolved_config_as_toml(tmp_path):
    path = tmp_path / "llmux.toml"
    path.write_text(GOOD)
    r = run("-c", str(path), "--check-config")
    assert r.returncode == 0, r.stderr
    data = tomllib.loads(r.stdout)
    assert data["models"]["qwen"]["sleep_level"] == 1
    assert data["models"]["qwen"]["gpu_memory_utilization"] == 0.9      # default filled
    assert data["daemon"]["startup_timeout_secs"] == 1800.0
    assert data["proxy"]["port"] == 3999


def test_check_config_json(tmp_path):
    path = tmp_path / "llmux.toml"
    path.write_text(GOOD)
    r = run("-c", str(path), "--check-config", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["models"]["qwen"]["port"] == 8001


def test_check_config_lists_every_error_with_its_key_path_and_exits_2(tmp_path):
    path = tmp_path / "llmux.toml"
    path.write_text(BAD)
    r = run("-c", str(path), "--check-config")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert "models.qwen-14b.sleep_level: must be 1, 2 or 3" in lines
    assert "policy.sleep_level: must be 1, 2 or 3" in lines
    assert "models.qwen-14b.colour: unknown key" in lines
    assert "Traceback" not in r.stderr


def test_a_config_error_at_start_is_readable_lines_and_exit_2(tmp_path):
    path = tmp_path / "llmux.toml"
    path.write_text(BAD)
    r = run("-c", str(path))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "models.qwen-14b.sleep_level: must be 1, 2 or 3" in r.stderr.splitlines()


def test_missing_config_file_is_one_line_and_exit_2(tmp_path):
    r = run("-c", str(tmp_path / "nope.toml"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "cannot read" in r.stderr


def test_seed_json_config_is_accepted(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"models": {"m": {"model_path": "p", "port": 8001}},
                                "port": 3000}))
    r = run("-c", str(path), "--check-config", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["models"]["m"]["sleep_level"] == 3


def test_a_second_daemon_on_the_same_socket_exits_1_with_one_line(make_daemon):
    from llmux_testkit.daemon import sim_model
    d = make_daemon({"a": sim_model()})
    r = subprocess.run([*LLMUXD, "-c", str(d.config_path), "--no-frontend"],
                       capture_output=True, text=True, timeout=60, env=d.env())
    assert r.returncode == 1
    assert f"another llmuxd is listening on {d.socket}" in r.stderr
    assert "Traceback" not in r.stderr
    assert d.request("GET", "/v1/health")[0] == 200     # the first one is untouched


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("llmuxd ")
