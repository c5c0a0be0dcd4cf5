"""Issue 12, supervisor side: reload, kill, validate and reap leave nothing behind.

Each test drives a real llmuxd with simulated vLLM children (fault flags where a
child must misbehave) and checks what a user would notice: a lease that is
granted is served by the child with the current config, a kill is a SIGKILL, a
validate always answers and unpins, nothing outlives the daemon. Each one was
seen failing on the code before its fix (or, where the restructure of issue 9
already fixed the finding, guards it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from llmux_testkit.daemon import DaemonProcess, sim_model

from .daemon_helpers import chat, lease, leased_chat, release

SLOW_START = 20          # wall-clock seconds a slow child takes to come up


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a thread; its result (or exception) lands in the dict."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["result"] = fn()
        except Exception as exc:
            out["error"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


def joined(t: threading.Thread, out: dict[str, Any], timeout: float = 120.0) -> Any:
    t.join(timeout)
    assert not t.is_alive(), "the background call never returned"
    assert "error" not in out, out
    return out["result"]


def reload_to(d: DaemonProcess, models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    d.write_config(models)
    code, body = d.request("POST", "/v1/reload")
    assert code == 200, body
    return dict(body)


def cmdline_of(pid: int) -> list[str]:
    return list(psutil.Process(pid).cmdline())


def util_arg(pid: int) -> str:
    cmd = cmdline_of(pid)
    return cmd[cmd.index("--gpu-memory-utilization") + 1]


def revoked(d: DaemonProcess, model: str) -> list[dict[str, Any]]:
    return [e for e in d.log_events("leases_revoked") if e.get("model") == model]


def child_log(d: DaemonProcess, model: str) -> str:
    path = d.log_dir / f"{model}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def sim_processes(d: DaemonProcess) -> list[psutil.Process]:
    found = []
    for p in d.descendants():
        with contextlib.suppress(psutil.Error):
            if any("llmux-sim-vllm" in part or "vllmsim" in part for part in p.cmdline()):
                found.append(p)
    return found


# ---------------------------------------------------------------------------
# Reload


class BlockedGpuRead:
    """Make the simulated GPUs' ``gpus.json`` a FIFO: every probe read blocks until freed.

    A preflight (the GPU memory check before a start) reads it, so this holds a
    preflight open for as long as a test needs, like a slow NVML would.
    """

    def __init__(self, d: DaemonProcess) -> None:
        self.path = d.gpu_dir / "gpus.json"
        self.saved = self.path.read_bytes()
        self.fifo = d.tmp / "gpus.fifo"
        os.mkfifo(self.fifo)
        link = d.gpu_dir / "gpus.fifo-link"
        os.link(self.fifo, link)
        os.replace(link, self.path)

    def free(self, timeout: float = 30.0) -> None:
        """Put the real file back, then feed the readers already blocked on the FIFO."""
        tmp = self.path.with_suffix(".restore")
        tmp.write_bytes(self.saved)
        os.replace(tmp, self.path)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:             # ENXIO: no reader has it open yet
                assert time.monotonic() < deadline, "no reader on the FIFO"
                time.sleep(0.05)
        try:
            os.write(fd, self.saved)
        finally:
            os.close(fd)


def test_a_model_removed_while_its_preflight_runs_is_never_started(make_daemon):
    d = make_daemon({"a": sim_model(), "b": sim_model()})
    blocked = BlockedGpuRead(d)
    code, _ = d.request("POST", "/v1/models/a/start?wait=0")
    assert code == 202
    d.wait_for(lambda: d.status("a")["operation"] == "preflight", what="a's preflight")
    assert reload_to(d, {"b": d.models["b"]})["removed"] == ["a"]
    blocked.free()
    d.wait_for(lambda: d.log_events("model_removed"), what="a to be forgotten")
    code, body = d.request("GET", "/v1/models/a")
    assert (code, body["error"]["code"]) == (404, "model_not_found"), body
    starts = [e for e in d.log_events("transition")
              if e["model"] == "a" and e["to_state"] == "starting"]
    assert starts == [], starts
    assert sim_processes(d) == []
    leased_chat(d, "b")


def test_a_model_removed_and_re_added_during_its_start_runs_the_new_config(make_daemon):
    d = make_daemon({"a": sim_model(extra_args=["--sim-fault", f"slow_start={SLOW_START}"]),
                     "b": sim_model()})
    models = dict(d.models)
    code, _ = d.request("POST", "/v1/models/a/start?wait=0")
    assert code == 202
    d.wait_state("a", "starting")
    assert reload_to(d, {"b": models["b"]})["removed"] == ["a"]
    readded = {**models, "a": {**models["a"], "gpu_memory_utilization": 0.5,
                               "extra_args": []}}
    assert reload_to(d, readded)["added"] == ["a"]
    t, out = in_background(lambda: lease(d, "a"))
    code, grant = joined(t, out)
    assert code == 200, grant
    pid = d.status("a")["pid"]
    assert util_arg(pid) == "0.5"            # the child serving the lease is the new one
    assert chat(grant)
    release(d, grant["lease_id"])
    assert revoked(d, "a") == []


def test_a_reload_during_a_start_never_grants_a_lease_it_then_revokes(make_daemon):
    d = make_daemon({"a": sim_model(extra_args=["--sim-fault", f"slow_start={SLOW_START}"])})
    models = dict(d.models)
    t, out = in_background(lambda: lease(d, "a"))
    d.wait_state("a", "starting")
    reload_to(d, {"a": {**models["a"], "gpu_memory_utilization": 0.5, "extra_args": []}})
    code, grant = joined(t, out)
    assert code == 200, grant
    pid = d.status("a")["pid"]
    assert util_arg(pid) == "0.5"
    assert chat(grant)                       # the lease is good: its child stays
    release(d, grant["lease_id"])
    assert revoked(d, "a") == []
    assert d.status("a")["state"] == "active"


def test_changing_only_aliases_and_sleep_level_applies_in_place(make_daemon):
    d = make_daemon({"a": sim_model(sleep_level=1), "b": sim_model()})
    models = dict(d.models)
    code, held = lease(d, "a")
    assert code == 200, held
    pid = d.status("a")["pid"]
    result = reload_to(d, {**models, "a": {**models["a"], "sleep_level": 2,
                                            "aliases": ["alpha"]}})
    assert result["changed"] == ["a"], result
    a = d.status("a")
    assert (a["state"], a["pid"], a["configured_sleep_level"], a["aliases"]) == \
        ("active", pid, 2, ["alpha"]), a
    assert chat(held)                        # the in-flight lease was not cut off
    code, leases = d.request("GET", "/v1/leases")
    assert [x["lease_id"] for x in leases["leases"]] == [held["lease_id"]], leases
    release(d, held["lease_id"])
    code, by_alias = lease(d, "alpha")
    assert code == 200 and by_alias["model"] == "a", by_alias
    release(d, by_alias["lease_id"])
    leased_chat(d, "b")                      # a leaves at its new level
    a = d.wait_state("a", "sleeping")
    assert a["sleep_level"] == 2 and a["pid"] == pid, a
    assert revoked(d, "a") == []


def test_a_reload_while_shutting_down_is_refused(make_daemon):
    d = make_daemon({"a": sim_model()}, config={"daemon": {"drain_timeout_secs": 60.0}})
    code, held = lease(d, "a")
    assert code == 200, held
    os.kill(d.pid, signal.SIGTERM)
    d.wait_for(lambda: d.log_events("shutting_down"), what="the shutdown")
    d.write_config({**d.models, "n": sim_model()})
    code, body = d.request("POST", "/v1/reload")
    assert (code, body["error"]["code"]) == (503, "shutting_down"), body
    os.kill(d.pid, signal.SIGHUP)            # a SIGHUP is not applied either
    d.wait_for(lambda: d.log_events("reload_refused"), what="the SIGHUP refusal")
    assert d.log_events("reloaded") == []
    release(d, held["lease_id"])
    assert d.proc is not None and d.proc.wait(60) == 0


# ---------------------------------------------------------------------------
# Kill and reap


def test_kill_during_starting_sends_sigkill_not_sigterm(make_daemon):
    d = make_daemon({"a": sim_model(extra_args=["--sim-fault", "ignore_sigterm",
                                                "--sim-fault", "never_healthy"])},
                    config={"daemon": {"stop_timeout_secs": 60.0}})
    code, _ = d.request("POST", "/v1/models/a/start?wait=0")
    assert code == 202
    d.wait_for(lambda: "will never listen" in child_log(d, "a"), what="a's child to load")
    leaders = [p.pid for p in sim_processes(d) if os.getpgid(p.pid) == p.pid]
    assert len(leaders) == 1, leaders
    pid = leaders[0]
    code, body = d.request("POST", "/v1/models/a/kill")
    assert (code, body["state"]) == (200, "stopped"), body
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert "ignoring SIGTERM" not in child_log(d, "a")
    stopped = [e for e in d.log_events("transition")
               if e["model"] == "a" and e["to_state"] == "stopped"]
    assert "exit code -9" in stopped[-1]["reason"], stopped


def test_kill_during_a_preflight_cancels_the_start(make_daemon):
    d = make_daemon({"a": sim_model()})
    blocked = BlockedGpuRead(d)
    t, out = in_background(lambda: lease(d, "a"))
    d.wait_for(lambda: d.status("a")["operation"] == "preflight", what="a's preflight")
    code, body = d.request("POST", "/v1/models/a/kill")
    assert (code, body["state"]) == (200, "stopped"), body
    blocked.free()
    code, refused = joined(t, out)
    assert (code, refused["error"]["code"]) == (503, "model_failed"), refused
    d.wait_for(lambda: d.status("a")["operation"] is None, what="the preflight to end")
    starts = [e for e in d.log_events("transition")
              if e["model"] == "a" and e["to_state"] == "starting"]
    assert starts == [], starts
    assert sim_processes(d) == []
    leased_chat(d, "a")                      # a later request starts it


class SlowSpawnChild:
    """A child whose spawn is still running when the stop comes (records signals)."""

    pid = 4242

    def __init__(self) -> None:
        self.calls: list[str] = []

    def kill(self) -> int:
        self.calls.append("kill")
        return -9

    def stop(self, grace: float) -> int:
        self.calls.append(f"stop({grace:g})")
        return 0

    def poll(self) -> int | None:
        return None

    def tail(self, n: int) -> list[str]:
        return []


def test_a_kill_that_cancels_a_start_still_spawning_sigkills_the_late_child(
        monkeypatch, tmp_path):
    """The spawn window: the kill finds no child yet; the one spawned after is killed."""
    from llmuxd.child import ChildProcess
    from llmuxd.child_ops import OpFailed, start_child, stop_child
    from llmuxd.config import build_config
    from llmuxd.model import Operation

    fake = SlowSpawnChild()
    spawning, go = threading.Event(), threading.Event()

    def slow_spawn(*_a: Any, **_k: Any) -> SlowSpawnChild:
        spawning.set()
        assert go.wait(30)
        return fake

    monkeypatch.setattr(ChildProcess, "spawn", staticmethod(slow_spawn))
    cfg = build_config({"daemon": {"stop_timeout_secs": 30.0},
                        "models": {"a": {"model_path": "m", "port": 1}}})
    op = Operation(op_id=1, kind="start")

    def start() -> None:
        try:
            start_child(op, cfg, cfg.models["a"], tmp_path, None, None)
        except OpFailed:
            pass
        finally:
            op.ended.set()                   # what OpRunner does when work returns

    t_start, started = in_background(start)
    assert spawning.wait(30)
    op.detach(kill=True)                     # stop_model(kill=True): no child known yet
    t_stop, stopped = in_background(lambda: stop_child(None, 30.0, True, op))
    go.set()
    joined(t_start, started)
    _secs, rc = joined(t_stop, stopped)
    assert rc == -9
    assert fake.calls and all(c == "kill" for c in fake.calls), fake.calls


STRAGGLER = """#!/bin/sh
# A vLLM child whose group keeps a member that outlives the server and ignores
# SIGTERM (an engine worker stuck in the driver): only SIGKILL ends it.
sh -c 'trap "" TERM; exec sleep 600' &
echo $! > "$STRAGGLER_PIDFILE"
exec llmux-sim-vllm "$@"
"""


def test_a_crashed_childs_group_is_stopped_before_the_daemon_exits(make_daemon, tmp_path):
    wrapper = tmp_path / "vllm-with-straggler"
    wrapper.write_text(STRAGGLER)
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    pidfile = tmp_path / "straggler.pid"
    d = make_daemon({"a": sim_model(env={"STRAGGLER_PIDFILE": str(pidfile)})},
                    config={"vllm_command": str(wrapper)})
    straggler = 0
    try:
        leased_chat(d, "a")
        straggler = int(pidfile.read_text())
        leader = d.status("a")["pid"]
        os.kill(leader, signal.SIGKILL)
        d.wait_for(lambda: d.log_events("child_died"), what="the crash to be seen")
        assert d.stop() == 0
        assert not _alive(straggler), "the crashed child's group outlived the daemon"
    finally:
        if straggler:
            with contextlib.suppress(ProcessLookupError):
                os.kill(straggler, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------------------
# Validate


def test_kill_during_validates_drain_answers_the_caller_and_unpins(make_daemon):
    d = make_daemon({"a": sim_model(sleep_level=1)},
                    config={"daemon": {"drain_timeout_secs": 60.0}})
    code, held = lease(d, "a")               # the validate's drain waits for it
    assert code == 200, held
    t, out = in_background(lambda: d.request("POST", "/v1/validate/a", {"levels": [1]}))
    d.wait_for(lambda: d.status("a")["state"] == "draining", what="validate's drain")
    code, body = d.request("POST", "/v1/models/a/kill")
    assert (code, body["state"]) == (200, "stopped"), body
    code, answer = joined(t, out)
    assert (code, answer["error"]["code"]) == (503, "model_failed"), answer
    assert "cut short" in answer["error"]["message"], answer
    code, report = d.request("POST", "/v1/validate/a", {"levels": [1]})
    assert code == 200 and report["passed"] is True, report
    assert d.status("a")["state"] == "active"


def test_a_validate_that_cannot_get_its_gpus_ends_at_its_deadline(make_daemon):
    # b takes SLOW_START seconds to start on the same GPU: a's validate waits for
    # it to leave ("exclusive"), and its deadline ends the wait.
    d = make_daemon({"a": sim_model(gpu_memory_utilization=0.4),
                     "b": sim_model(gpu_memory_utilization=0.4,
                                    extra_args=["--sim-fault", f"slow_start={SLOW_START}"])},
                    config={"daemon": {"validate_timeout_secs": 2.0}})
    leased_chat(d, "a")
    code, _ = d.request("POST", "/v1/models/b/start?wait=0")
    assert code == 202
    d.wait_state("b", "starting")
    code, body = d.request("POST", "/v1/validate/a", {"levels": [1]})
    assert (code, body["error"]["code"]) == (504, "timeout"), body
    assert "exclusive" in body["error"]["message"], body
    a = d.status("a")
    assert a["state"] == "active", a
    leased_chat(d, "a")                      # unpinned, serving
    code, body = d.request("POST", "/v1/validate/a", {"levels": [1]})
    assert code != 409, body                 # not "already going on"


# ---------------------------------------------------------------------------
# The health watchdog, wired (llmuxd/watchdog_keeper.py)

FAST_WATCHDOG = {"daemon": {"watchdog_period_secs": 0.5, "watchdog_timeout_secs": 0.5,
                            "watchdog_misses": 2}}


def test_a_sigstopped_child_is_killed_its_leases_revoked_and_it_restarts_lazily(
        make_daemon):
    d = make_daemon({"a": sim_model()}, config=FAST_WATCHDOG)
    code, held = lease(d, "a")
    assert code == 200, held
    pid = d.status("a")["pid"]
    os.killpg(pid, signal.SIGSTOP)
    try:
        # A request already sent to the stopped child is answered (its connection
        # breaks with the kill) long before its own timeout.
        t, out = in_background(lambda: chat(held))
        a = d.wait_for(lambda: (lambda s: s if "hung" in (s["last_error"] or "") else None)(
            d.status("a")), what="the hang to be noticed")
        assert "health checks failed" in a["last_error"], a
        t.join(60)
        assert not t.is_alive(), "the request to the hung child was never answered"
        assert "error" in out and not isinstance(out["error"], TimeoutError), out
        d.wait_for(lambda: not _alive(pid), what="the hung group to be killed")
        code, body = d.request("POST", f"/v1/leases/{held['lease_id']}/release",
                               {"status": 502, "duration_ms": 1.0})
        assert code == 200, body
        [hung] = d.log_events("child_hung")
        assert hung["pid"] == pid and hung["model"] == "a", hung
        assert [e for e in revoked(d, "a") if "hung" in e["reason"]], revoked(d, "a")
        leased_chat(d, "a")                  # the next request starts a fresh child
        assert d.status("a")["pid"] != pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGCONT)


def test_a_child_silent_during_its_sleep_is_left_to_the_sleeps_own_timeout(make_daemon):
    """No false alarm: while an operation with its own deadline runs, no judgement."""
    slow = sim_model(sleep_level=1, env={"LLMUX_SIM_TIME_SCALE": "1"},
                     extra_args=["--sim-load-s", "0.1", "--sim-warmup-s", "0",
                                 "--sim-size-gib", "40"])      # L1 sleep ~0.8 s
    d = make_daemon({"a": slow, "b": sim_model()},
                    config={"daemon": {**FAST_WATCHDOG["daemon"], "sleep_timeout_secs": 3.0}})
    leased_chat(d, "a")
    pid = d.status("a")["pid"]
    t, out = in_background(lambda: lease(d, "b"))      # a must sleep for b
    d.wait_for(lambda: d.status("a")["operation"] == "sleep1", what="a's sleep")
    os.killpg(pid, signal.SIGSTOP)           # silent for longer than the watchdog bound
    try:
        code, grant = joined(t, out)
        assert code == 200, grant
        release(d, grant["lease_id"])
        a = d.wait_state("a", "stopped")     # the sleep timed out: escalated to L3
        assert "sleep at level 1 failed" in a["last_error"], a
        assert not _alive(pid)
        assert d.log_events("child_hung") == []
        assert d.log_events("hang_report_ignored") == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGCONT)


def test_a_burst_of_connections_to_a_unix_socket_child_is_accepted(make_daemon):
    """A model that wakes grants its waiters at once: ~180 connects in a burst (R1).

    On a Unix socket a connect beyond the listen backlog fails at once (EAGAIN) where
    TCP would retry, so the child must keep vLLM's (uvicorn's) backlog of 2048.
    """
    d = make_daemon({"a": sim_model()}, config={"daemon": {"child_transport": "unix"}})
    code, grant = lease(d, "a")
    assert code == 200, grant
    release(d, grant["lease_id"])
    path = grant["upstream"].removeprefix("unix:")
    socks: list[socket.socket] = []
    try:
        for _ in range(400):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            s.settimeout(10.0)
            s.connect(path)
    finally:
        for s in socks:
            s.close()
