"""Every simulator fault, set by flag or at run time, seen from outside the process."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from llmux_testkit.sim import SimProcess, init_gpus, wait_for
from vllmsim.gpustate import GpuState

FULL = int(0.9 * 81920)


def sim(tmp_path: Path, *faults: str, **kw: Any) -> SimProcess:
    kw.setdefault("log_path", tmp_path / "sim.log")
    return SimProcess(faults=faults, **kw)


def refused(url: str) -> bool:
    try:
        requests.get(url + "/health", timeout=2)
    except requests.ConnectionError:
        return True
    return False


def test_crash_at_start_exits_1_without_ever_listening(tmp_path: Path) -> None:
    s = sim(tmp_path, "crash_at_start").start()
    try:
        assert s.wait_exit(60) == 1
    finally:
        s.stop()
    assert "crash_at_start" in s.log()
    assert refused(s.url)


def test_never_healthy_keeps_loading_until_stopped(tmp_path: Path) -> None:
    s = sim(tmp_path, "never_healthy").start()
    try:
        wait_for(lambda: "will never listen" in s.log(), 60, "the never_healthy notice")
        assert s.poll() is None
        assert refused(s.url)
        assert "Application startup complete" not in s.log()
        s.signal(signal.SIGTERM)
        assert s.wait_exit(30) == 0
    finally:
        s.stop()


def test_slow_start_delays_health_by_at_least_the_given_seconds(tmp_path: Path) -> None:
    s = sim(tmp_path, "slow_start=1.5")
    t0 = time.monotonic()
    with s:
        assert time.monotonic() - t0 >= 1.5


def test_sleep_500(tmp_path: Path) -> None:
    state = GpuState(init_gpus(tmp_path / "gpus"))
    with sim(tmp_path, "sleep_500", gpu_state=state.dir) as s:
        r = s.post("/sleep?level=1")
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "InternalServerError"
        assert r.headers.get("connection") == "close"
        assert s.get("/is_sleeping").json() == {"is_sleeping": False}
        assert state.usage_by_pid()[s.engine_pid()] == {0: FULL}


def test_sleep_hang_never_answers(tmp_path: Path) -> None:
    with sim(tmp_path, "sleep_hang") as s:
        with pytest.raises(requests.ReadTimeout):
            s.post("/sleep?level=1", timeout=2)
        assert s.get("/is_sleeping").json() == {"is_sleeping": False}
        assert s.get("/health").status_code == 200


def test_sleep_no_free_answers_200_but_keeps_the_memory(tmp_path: Path) -> None:
    state = GpuState(init_gpus(tmp_path / "gpus"))
    with sim(tmp_path, "sleep_no_free", gpu_state=state.dir) as s:
        assert s.post("/sleep?level=1").json() == {"status": "sleeping", "level": 1}
        assert s.get("/is_sleeping").json() == {"is_sleeping": True}
        assert state.usage_by_pid()[s.engine_pid()] == {0: FULL}


def test_wake_500_then_cleared_at_run_time(tmp_path: Path) -> None:
    with sim(tmp_path, "wake_500") as s:
        assert s.post("/sleep?level=1").status_code == 200
        r = s.post("/wake_up")
        assert r.status_code == 500
        assert s.get("/is_sleeping").json() == {"is_sleeping": True}
        assert s.set_faults(clear=["wake_500"]) == {}
        assert s.post("/wake_up").json() == {"status": "awake", "tags": None}


def test_reload_fail(tmp_path: Path) -> None:
    with sim(tmp_path, "reload_fail") as s:
        s.post("/sleep?level=2")
        s.post("/wake_up?tags=weights")
        r = s.post("/collective_rpc", {"method": "reload_weights"})
        assert r.status_code == 500
        assert "unexpected keyword argument 'weight_name'" in r.json()["error"]["message"]


def test_die_mid_stream_cuts_the_stream_and_the_process(tmp_path: Path) -> None:
    state = GpuState(init_gpus(tmp_path / "gpus"))
    s = sim(tmp_path, "die_mid_stream=3", gpu_state=state.dir, time_scale=1.0,
            args=["--sim-load-s", "0", "--sim-warmup-s", "0", "--sim-token-rate", "20"])
    with s:
        events: list[bytes] = []
        with pytest.raises(requests.exceptions.ChunkedEncodingError), \
                requests.post(s.url + "/v1/completions", stream=True, timeout=30,
                              json={"prompt": "hi", "max_tokens": 50, "stream": True}) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
        assert len(events) == 3
        assert b"[DONE]" not in b"".join(events)
        assert s.wait_exit(30) == 1
        wait_for(lambda: state.usage_by_pid() == {}, 30, "the engine's memory to be freed")


def test_ignore_sigterm_needs_sigkill(tmp_path: Path) -> None:
    s = sim(tmp_path, "ignore_sigterm")
    with s:
        s.signal(signal.SIGTERM)
        wait_for(lambda: "ignoring SIGTERM" in s.log(), 30, "the ignore notice")
        assert s.get("/health").status_code == 200
        with pytest.raises(subprocess.TimeoutExpired):
            s.wait_exit(1.0)
        assert s.stop(grace=1.0) == -signal.SIGKILL


def test_exit_after_n_requests(tmp_path: Path) -> None:
    with sim(tmp_path, "exit_after=2") as s:
        for _ in range(2):
            r = s.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
            assert r.status_code == 200
        assert s.wait_exit(30) == 1
        assert "exit_after" in s.log()


def test_faults_from_env(tmp_path: Path) -> None:
    import os

    env = dict(os.environ, LLMUX_SIM_FAULTS="sleep_500")
    with sim(tmp_path, env=env) as s:
        assert s.state()["faults"] == {"sleep_500": True}
        assert s.post("/sleep").status_code == 500


def test_runtime_fault_api(tmp_path: Path) -> None:
    with sim(tmp_path) as s:
        assert s.set_faults({"sleep_500": True, "exit_after": 5}) == {"sleep_500": True,
                                                                     "exit_after": 5}
        assert s.post("/sleep").status_code == 500
        r = requests.post(s.url + "/_sim/faults", json={"set": {"bogus": True}}, timeout=10)
        assert r.status_code == 400
        assert "unknown fault" in r.json()["error"]["message"]
        r = requests.post(s.url + "/_sim/faults", data=b"{", timeout=10)
        assert r.status_code == 400
        assert s.get("/_sim/faults").json() == {"faults": {"sleep_500": True, "exit_after": 5}}
