"""Issue 12's findings and R2 faults, each through the real daemon (sim children).

Each test states the outcome a user should see. Those whose fix lived in the
supervisor modules (phase 2: tests/daemon/test_reliability_fixes.py has the
supervisor-side tests written first) were strict xfails until that fix landed.
The R2 faults already covered elsewhere are listed in docs/reliability.md with
their tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import tomllib
from typing import Any

import psutil

from llmux_testkit.daemon import DaemonProcess, post_json, sim_model, write_toml
from llmuxd.child import log_file_name
from llmuxd.watchdog import WatchdogSettings
from tests.daemon.daemon_helpers import lease, leased_chat, release, set_faults

UNIX = {"daemon": {"child_transport": "unix"}}


def ask(port: int, model: str, timeout: float) -> tuple[int, Any]:
    return post_json("127.0.0.1", port, "/v1/chat/completions", {
        "model": model, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": "hi"}]}, timeout)


def frontend_port(d: DaemonProcess) -> int:
    return int(tomllib.loads(d.config_path.read_text())["port"])


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except Exception as exc:  # the assertion below shows it
            out.append(exc)
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def reload_with(d: DaemonProcess, models: dict[str, dict[str, Any]]) -> tuple[int, Any]:
    d.models = models
    write_toml(d.config_path, {**d.config_dict(), "port": frontend_port(d)}
               if d.frontend else d.config_dict())
    return d.request("POST", "/v1/reload", {})


# ---------------------------------------------------------------------------
# A hung child (R2: child SIGSTOP)


def test_sigstopped_child_is_detected_and_its_client_answered_within_the_bound(make_daemon):
    d = make_daemon({"a": sim_model(sleep_level=1)}, config=UNIX, frontend=True)
    port = frontend_port(d)
    code, body = ask(port, "a", 120)
    assert code == 200, body
    pid = d.status("a")["pid"]
    os.killpg(pid, signal.SIGSTOP)
    try:
        bound = WatchdogSettings().detection_bound() + WatchdogSettings().timeout_s
        code, body = ask(port, "a", bound + 10)    # raises TimeoutError unfixed
        assert code == 502, body
        assert "hung" in json.dumps(body)
        a = d.status("a")
        assert "hung" in (a["last_error"] or ""), a
        code, body = ask(port, "a", 120)           # restarted lazily
        assert code == 200, body
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGCONT)


# ---------------------------------------------------------------------------
# Kill during validate


def test_kill_during_validate_leaves_no_pin_and_no_stuck_job(make_daemon):
    d = make_daemon({"a": sim_model(sleep_level=1), "b": sim_model(sleep_level=1)})
    leased_chat(d, "a")
    set_faults(d.status("a")["port"], {"sleep_hang": True})
    th, out = in_thread(d.request, "POST", "/v1/validate/a", {"levels": [1]})
    d.wait_for(lambda: d.status("a")["state"] in ("draining", "sleeping") or out,
               what="the validate to reach its sleep step")
    code, body = d.request("POST", "/v1/models/a/kill", {})
    assert code == 200, body
    th.join(60)
    assert out and not isinstance(out[0], Exception), out
    code, body = out[0]
    assert code != 200 or body.get("error"), body      # the report says it was cut
    leased_chat(d, "a")
    leased_chat(d, "b")                                # 'a' is evictable again
    code, body = d.request("POST", "/v1/validate/a", {"levels": [1]}, timeout=120)
    assert code == 200, body                           # not "already going on"


# ---------------------------------------------------------------------------
# Reload leftovers


def test_changing_only_aliases_or_sleep_level_keeps_the_active_child(make_daemon):
    models = {"a": sim_model(sleep_level=1)}
    d = make_daemon(models)
    code, held = lease(d, "a")
    assert code == 200, held
    pid = d.status("a")["pid"]
    code, body = reload_with(d, {"a": {**models["a"], "aliases": ["alpha"],
                                       "sleep_level": 2}})
    assert code == 200, body
    assert d.status("a")["pid"] == pid and d.status("a")["state"] == "active"
    code, body = d.request("POST", f"/v1/leases/{held['lease_id']}/release",
                           {"status": 200, "duration_ms": 1.0})
    assert code == 200 and "revoked" not in body, body
    assert d.status("alpha")["name"] == "a"


def test_reload_during_a_start_never_grants_then_revokes(make_daemon):
    models = {"a": sim_model(sleep_level=1, extra_args=["--sim-fault", "slow_start=3"])}
    d = make_daemon(models)
    th, out = in_thread(lease, d, "a")
    d.wait_state("a", "starting")
    changed = {"a": {**models["a"], "gpu_memory_utilization": 0.5}}
    code, body = reload_with(d, changed)
    assert code == 200, body
    th.join(120)
    code, grant = out[0]
    assert code == 200, grant
    code, body = d.request("POST", f"/v1/leases/{grant['lease_id']}/release",
                           {"status": 200, "duration_ms": 1.0})
    assert code == 200 and "revoked" not in body, body


def test_a_model_removed_during_its_start_leaves_no_child(make_daemon):
    models = {"a": sim_model(sleep_level=1, extra_args=["--sim-fault", "slow_start=3"]),
              "b": sim_model(sleep_level=1)}
    d = make_daemon(models)
    th, out = in_thread(lease, d, "a")
    pid = d.wait_for(lambda: d.status("a")["pid"], what="a's child to exist")
    code, body = reload_with(d, {"b": models["b"]})
    assert code == 200, body
    th.join(120)
    assert out and out[0][0] != 200, out
    d.wait_for(lambda: not psutil.pid_exists(pid)
               or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
               what="the removed model's child to be stopped")
    assert "a" not in d.status()["models"]


def test_a_model_removed_then_re_added_while_stopping_serves_with_the_new_config(make_daemon):
    models = {"a": sim_model(sleep_level=1, extra_args=["--sim-fault", "ignore_sigterm"]),
              "b": sim_model(sleep_level=1)}
    d = make_daemon(models)
    leased_chat(d, "a")
    code, body = reload_with(d, {"b": models["b"]})
    assert code == 200, body
    # A removed model has no status any more (404): its stop shows in the log.
    d.wait_for(lambda: [e for e in d.log_events("transition")
                        if e["model"] == "a" and e["to_state"] == "stopping"],
               what="the removed model to be stopping")
    back = {**models["a"], "extra_args": [], "gpu_memory_utilization": 0.5}
    code, body = reload_with(d, {"a": back, "b": models["b"]})
    assert code == 200, body
    code, grant = lease(d, "a", timeout=60)
    assert code == 200, grant
    release(d, grant["lease_id"])
    cmd = psutil.Process(d.status("a")["pid"]).cmdline()
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.5", cmd


# ---------------------------------------------------------------------------
# Kill during STARTING, reload during shutdown


def test_kill_during_starting_is_sigkill_at_once(make_daemon):
    models = {"a": sim_model(extra_args=["--sim-fault", "slow_start=30"])}
    d = make_daemon(models)
    th, _ = in_thread(lease, d, "a")
    d.wait_state("a", "starting")
    code, body = d.request("POST", "/v1/models/a/kill", {})
    assert code == 200, body
    th.join(60)
    d.wait_state("a", "stopped")
    log = (d.log_dir / log_file_name("a")).read_text(errors="replace")
    assert "received signal 15" not in log     # the child was never asked politely


def test_reload_during_shutdown_is_refused(make_daemon):
    d = make_daemon({"a": sim_model(sleep_level=1)},
                    config={"daemon": {"drain_timeout_secs": 30.0}})
    code, held = lease(d, "a")                  # keeps the shutdown draining
    assert code == 200, held
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    d.wait_for(lambda: d.request("GET", "/v1/health")[1].get("status") != "ok"
               or d.log_events("shutdown"), what="the shutdown to begin")
    try:
        code, body = d.request("POST", "/v1/reload", {})
        assert code == 503 and body["error"]["code"] == "shutting_down", body
    finally:
        release(d, held["lease_id"])


# ---------------------------------------------------------------------------
# R2: disk full for the logs, start OOM


def test_disk_full_for_the_child_log_does_not_stop_the_model_from_serving(make_daemon):
    """The log file of 'a' is /dev/full (every write: ENOSPC): the model still serves."""
    d = DaemonProcess({"a": sim_model(sleep_level=1)})
    d.log_dir.mkdir(parents=True)
    (d.log_dir / log_file_name("a")).symlink_to("/dev/full")
    d2 = make_daemon(d.models, tmp=d.tmp)
    answer, _ = leased_chat(d2, "a")
    assert answer
    assert d2.status("a")["state"] == "active"


def test_start_oom_answers_the_waiter_with_the_reason_and_keeps_serving_others(make_daemon):
    """Another process holds the GPU: 'a' cannot fit; its client gets a clear refusal in
    bounded time (never a hang), and 'b' (which fits) still serves."""
    d = make_daemon({"a": sim_model(sleep_level=1, gpu_memory_utilization=0.9),
                     "b": sim_model(sleep_level=1, gpu_memory_utilization=0.05)},
                    config={"policy": {"request_timeout_secs": 5.0}})
    hog = subprocess.Popen(
        ["llmux-sim-vllm", "serve", "sim/hog", "--port", "0", "--enable-sleep-mode",
         "--gpu-memory-utilization", "0.5", "--sim-time-scale", "0.01"],
        env={**d.env(), "LLMUX_SIM_GPU_STATE": str(d.gpu_dir)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        from llmuxd.gpu.sim import SimGpuProbe
        d.wait_for(lambda: sum(g.used_mib for g in SimGpuProbe(d.gpu_dir).gpus()) > 0,
                   what="the foreign process to hold GPU memory")
        started = time.monotonic()
        code, body = lease(d, "a", timeout=60)
        assert code in (503, 504), body
        assert time.monotonic() - started < 60
        leased_chat(d, "b")
    finally:
        os.killpg(hog.pid, signal.SIGKILL)
        hog.wait(10)

