"""VllmClient against the simulator (and a tiny stdlib server for old-vLLM answers)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmuxd.child import ChildProcess
from llmuxd.config import Config
from llmuxd.gpu.memory import child_usage
from llmuxd.gpu.select import make_probe
from llmuxd.vllm_client import (
    ChildExited,
    OpTimeout,
    SleepFailed,
    VllmClient,
    WakeFailed,
    parse_prometheus,
    sleep_operation_seconds,
    sum_by_name,
)
from vllmsim.gpustate import GpuState

from .conftest import Reaper, SimStarter
from .simfix import free_port, sim_config, start_sim


def gpu_mib(config: Config, pids: list[int]) -> int:
    usage = GpuState(config.daemon.sim_gpu_state).usage_by_pid()
    return sum(sum(usage.get(pid, {}).values()) for pid in pids)


def test_health_is_true_on_a_running_child_and_false_on_a_closed_port(sim: SimStarter) -> None:
    _, client, _ = sim()
    assert client.health()
    assert not VllmClient(free_port(), "x").health(timeout=2)


def test_sleep_l1_and_wake_free_and_restore_the_gpu_memory(sim: SimStarter) -> None:
    child, client, config = sim()
    before = gpu_mib(config, child.group_pids())
    client.sleep(1, timeout=30)
    assert client.is_sleeping()
    asleep = gpu_mib(config, child.group_pids())
    client.wake(1, timeout=30)
    assert not client.is_sleeping()
    awake = gpu_mib(config, child.group_pids())
    assert before > 60000
    assert asleep < 2048
    assert awake == before


def test_l2_wake_runs_the_four_steps_and_serves_the_same_answer(sim: SimStarter) -> None:
    _, client, _ = sim()
    baseline = client.probe_completion(timeout=30)
    client.sleep(2, timeout=30)
    client.wake(2, timeout=30)
    assert client.probe_completion(timeout=30) == baseline


def test_sleep_500_raises_sleep_failed_with_the_status(sim: SimStarter) -> None:
    _, client, _ = sim(faults=("sleep_500",))
    with pytest.raises(SleepFailed, match="answered 500"):
        client.sleep(1, timeout=30)
    assert not client.is_sleeping()  # and the next call works on a fresh connection


def test_a_hung_sleep_raises_op_timeout(sim: SimStarter) -> None:
    _, client, _ = sim(faults=("sleep_hang",))
    with pytest.raises(OpTimeout):
        client.sleep(1, timeout=1.0)


def test_wake_500_raises_wake_failed_naming_the_step(sim: SimStarter) -> None:
    _, client, _ = sim(faults=("wake_500",))
    client.sleep(1, timeout=30)
    with pytest.raises(WakeFailed) as info:
        client.wake(1, timeout=30)
    assert (info.value.step, info.value.status) == ("wake", 500)
    assert "answered 500" in str(info.value)


def test_a_failed_reload_raises_wake_failed_at_the_reload_step(sim: SimStarter) -> None:
    _, client, _ = sim(faults=("reload_fail",))
    client.sleep(2, timeout=30)
    with pytest.raises(WakeFailed) as info:
        client.wake(2, timeout=30)
    assert (info.value.step, info.value.status) == ("reload weights", 500)


def test_wait_healthy_raises_child_exited_on_a_crash_at_start(tmp_path: Path) -> None:
    config = sim_config(tmp_path, faults=("crash_at_start",))
    with pytest.raises(ChildExited):
        start_sim(config, config.models["qwen"])  # kills the child itself on failure


def test_wait_healthy_raises_op_timeout_at_the_deadline(tmp_path: Path, reaper: Reaper) -> None:
    config = sim_config(tmp_path, faults=("never_healthy",))
    model = config.models["qwen"]
    child = reaper.track(ChildProcess.spawn(config, model, tmp_path / "logs"))
    client = VllmClient(model.port, model.name)
    with pytest.raises(OpTimeout, match="not ready"):
        client.wait_healthy(time.monotonic() + 1.0, child.is_alive, interval=0.05)
    assert child.is_alive()


def test_warmup_of_an_embedding_model_uses_an_embedding(sim: SimStarter) -> None:
    # A pooling model serves no /v1/completions (404): warm-up must not fail it.
    _, client, _ = sim(extra=("--runner", "pooling"))
    status = client.request("POST", "/v1/completions",
                            {"model": client.served_model_name, "prompt": "Hi"}).status
    assert status == 404
    client.warmup(timeout=30)


def test_warmup_and_probe_completion_answer(sim: SimStarter) -> None:
    _, client, _ = sim()
    client.warmup(timeout=30)
    answer = client.probe_completion(timeout=30)
    assert isinstance(answer, str) and answer
    assert client.probe_completion(timeout=30) == answer


def test_metrics_report_the_sleep_operation_time(sim: SimStarter) -> None:
    _, client, _ = sim()
    client.sleep(1, timeout=30)
    client.wake(1, timeout=30)
    metrics = client.metrics()
    assert "vllm:num_requests_running" in metrics
    slept = client.sleep_operation_seconds("sleep")
    assert slept is not None and slept >= 0


def test_a_child_that_sleeps_frees_memory_attributed_to_its_group(sim: SimStarter) -> None:
    child, client, config = sim()
    probe = make_probe(config)
    assert probe.name == "sim"
    client.sleep(1, timeout=30)
    assert child_usage(probe, child.group_pids(), (0,)) == {0: 1341}


def test_prometheus_parser_handles_labels_with_braces_quotes_and_nan() -> None:
    text = "\n".join([
        "# HELP vllm:x help",
        'vllm:sleep_mode_operation_duration_seconds_sum{model_name="m",operation="sleep"} 1.5',
        'vllm:sleep_mode_operation_duration_seconds_sum{model_name="m",operation="wake_up"} 2',
        'odd{a="x}y",b="q\\"z"} 3 1700000000',
        "plain 4",
        "broken{a=\"x\"} NaN",
    ])
    samples = parse_prometheus(text)
    assert samples[2].labels == {"a": "x}y", "b": 'q"z'}
    assert sleep_operation_seconds(samples, "sleep") == 1.5
    assert sleep_operation_seconds(samples, "missing") is None
    totals = sum_by_name(samples)
    assert totals["vllm:sleep_mode_operation_duration_seconds_sum"] == 3.5
    assert (totals["odd"], totals["plain"], "broken" in totals) == (3.0, 4.0, False)


# -- old vLLM: empty 200 answers, state flips later ---------------------------


class _OldVllm(http.server.BaseHTTPRequestHandler):
    """Answers /sleep and /wake_up with an empty 200 and changes state a bit later."""

    sleeping = False
    flips_after = 3  # is_sleeping polls before the state changes
    polls = 0
    calls: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        cls = type(self)
        cls.calls.append(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.path.startswith(("/sleep", "/wake_up")):
            cls.polls = 0
        self._send(200)

    def do_GET(self) -> None:
        cls = type(self)
        if self.path == "/is_sleeping":
            cls.polls += 1
            last = cls.calls[-1] if cls.calls else ""
            if cls.polls >= cls.flips_after:
                cls.sleeping = last.startswith("/sleep")
            self._send(200, json.dumps({"is_sleeping": cls.sleeping}).encode())
        else:
            self._send(404)


@pytest.fixture
def old_vllm() -> Iterator[int]:
    _OldVllm.calls = []
    _OldVllm.sleeping = False
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OldVllm)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_an_empty_200_sleep_is_confirmed_by_polling_is_sleeping(old_vllm: int) -> None:
    client = VllmClient(old_vllm, "m")
    client.sleep(1, timeout=30)
    assert _OldVllm.polls >= 3 and client.is_sleeping()
    client.wake(1, timeout=30)
    assert not client.is_sleeping()
    assert _OldVllm.calls == ["/sleep?level=1", "/wake_up"]


def test_l2_wake_sends_the_four_steps_in_order(old_vllm: int) -> None:
    client = VllmClient(old_vllm, "m")
    client.sleep(2, timeout=30)
    _OldVllm.calls.clear()
    _OldVllm.calls.append("/wake")  # the state flips to awake on the next polls
    client.wake(2, timeout=30)
    assert _OldVllm.calls[1:] == ["/wake_up?tags=weights", "/collective_rpc",
                                  "/wake_up?tags=kv_cache", "/reset_prefix_cache"]


def test_a_sleep_never_confirmed_is_an_op_timeout(old_vllm: int) -> None:
    _OldVllm.flips_after = 10**9
    try:
        with pytest.raises(OpTimeout, match="not confirmed"):
            VllmClient(old_vllm, "m").sleep(1, timeout=0.5)
    finally:
        _OldVllm.flips_after = 3


def test_level_3_is_not_an_http_sleep() -> None:
    with pytest.raises(ValueError, match="level 3 is a stop"):
        VllmClient(1, "m").sleep(3, timeout=1)
