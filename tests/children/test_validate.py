"""validate: standalone and on a running child, against the simulator and its GPUs."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest

from llmuxd.config import Config
from llmuxd.gpu.none import NoGpuProbe
from llmuxd.gpu.sim import SimGpuProbe
from llmuxd.validate import (
    ValidateError,
    ValidateReport,
    ValidateRow,
    format_table,
    run_validate,
    run_validate_on,
)
from vllmsim.gpustate import GpuState

from .conftest import SimStarter
from .simfix import sim_config

SEED_TABLE = """\
Level     Sleep (s)   Wake (s)   GPU Before    GPU After     GPU Wake   Response   Pass
----------------------------------------------------------------------------------------
L1             35.9        1.2      45899 MiB       1341 MiB      44033 MiB      match     OK
L2              0.3        8.2      44033 MiB       1341 MiB      44033 MiB      match     OK

Result: ALL PASSED"""


def probe_of(config: Config) -> SimGpuProbe:
    return SimGpuProbe(config.daemon.sim_gpu_state)


def no_engine_left(config: Config) -> bool:
    """True when no live simulated engine holds GPU memory (the child was stopped)."""
    return GpuState(config.daemon.sim_gpu_state).usage_by_pid() == {}


def test_format_table_reproduces_the_seed_layout_exactly() -> None:
    report = ValidateReport(model="qwen-14b", probe="nvml", levels=[1, 2], rows=[
        ValidateRow(1, 35.9, 1.2, 45899, 1341, 44033, "match", True),
        ValidateRow(2, 0.3, 8.2, 44033, 1341, 44033, "match", True),
    ])
    assert format_table(report) == SEED_TABLE


def test_format_table_shows_na_without_a_probe_and_the_reason_of_a_failure() -> None:
    report = ValidateReport(model="m", probe="none", levels=[1], rows=[
        ValidateRow(1, 0.04, None, None, None, None, "error", False, reason="wake failed: x")])
    lines = format_table(report).splitlines()
    assert lines[2] == ("L1              0.0        n/a            n/a            n/a"
                        "            n/a      error   FAIL")
    assert lines[-3:] == ["L1: FAIL: wake failed: x", "", "Result: SOME FAILED"]


def test_validate_passes_at_l1_and_l2_with_memory_freed_and_back(tmp_path: Path) -> None:
    config = sim_config(tmp_path)
    steps: list[str] = []
    report = run_validate(config, "qwen", [1, 2], probe_of(config), steps.append)
    assert report.passed, format_table(report)
    assert [(r.level, r.response, r.passed) for r in report.rows] == [
        (1, "match", True), (2, "match", True)]
    for row in report.rows:
        assert (row.gpu_before_mib, row.gpu_after_mib, row.gpu_wake_mib) == (73728, 1341, 73728)
        assert row.sleep_s is not None and row.wake_s is not None
    assert format_table(report).endswith("Result: ALL PASSED")
    assert any("reload_weights" in s for s in steps) and any("baseline" in s for s in steps)
    assert no_engine_left(config)


def test_validate_level_3_stops_and_cold_starts(tmp_path: Path) -> None:
    config = sim_config(tmp_path)
    report = run_validate(config, "qwen", [3], probe_of(config), None)
    assert report.passed, format_table(report)
    row = report.rows[0]
    assert (row.gpu_before_mib, row.gpu_after_mib, row.gpu_wake_mib) == (73728, 0, 73728)
    assert no_engine_left(config)


def test_validate_fails_when_the_sleep_frees_nothing(tmp_path: Path) -> None:
    config = sim_config(tmp_path, faults=("sleep_no_free",))
    report = run_validate(config, "qwen", [1], probe_of(config), None, settle_s=0.2)
    assert not report.passed
    row = report.rows[0]
    assert row.response == "match"  # the seed would have said OK
    assert (row.passed, row.gpu_after_mib) == (False, 73728)
    assert row.reason == ("sleep freed too little: GPU 0 still holds 73728 MiB "
                          "(allowed residue 2048 MiB)")
    text = format_table(report)
    assert "L1: FAIL: sleep freed too little" in text and text.endswith("Result: SOME FAILED")
    assert no_engine_left(config)


def test_validate_fails_on_a_broken_reload_and_goes_on_with_a_fresh_child(
        tmp_path: Path) -> None:
    config = sim_config(tmp_path, faults=("reload_fail",))
    report = run_validate(config, "qwen", [2, 1], probe_of(config), None)
    assert not report.passed
    l2, l1 = report.rows
    assert (l2.passed, l2.response) == (False, "error")
    assert "wake step 'reload weights'" in l2.reason and "500" in l2.reason
    assert (l1.passed, l1.response) == (True, "match")
    assert no_engine_left(config)


def test_validate_without_a_probe_judges_the_answer_only(tmp_path: Path) -> None:
    config = sim_config(tmp_path)
    report = run_validate(config, "qwen", [1], NoGpuProbe(), None)
    assert report.passed
    assert report.rows[0].gpu_after_mib is None
    assert "n/a" in format_table(report).splitlines()[2]


def test_validate_reports_a_crash_at_start_with_the_log_tail(tmp_path: Path) -> None:
    config = sim_config(tmp_path, faults=("crash_at_start",))
    report = run_validate(config, "qwen", [1], probe_of(config), None)
    assert not report.passed and report.rows == []
    assert "exited during start-up" in report.error
    assert "qwen.log" in report.error
    assert format_table(report).endswith("Result: SOME FAILED")


def test_validate_refuses_a_port_already_in_use(tmp_path: Path) -> None:
    config = sim_config(tmp_path)
    port = config.models["qwen"].port
    with contextlib.closing(socket.socket()) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
        report = run_validate(config, "qwen", [1], NoGpuProbe(), None)
    assert f"port {port}" in report.error and "llmuxctl validate" in report.error


def test_validate_rejects_an_unknown_model_and_bad_levels(tmp_path: Path) -> None:
    config = sim_config(tmp_path)
    with pytest.raises(ValidateError, match="unknown model 'nope'"):
        run_validate(config, "nope", [1], NoGpuProbe(), None)
    with pytest.raises(ValidateError, match="not 4"):
        run_validate(config, "qwen", [1, 4], NoGpuProbe(), None)
    with pytest.raises(ValidateError, match="no levels"):
        run_validate(config, "qwen", [], NoGpuProbe(), None)


def test_validate_on_a_running_child_passes_and_skips_level_3(sim: SimStarter) -> None:
    child, client, config = sim()
    report = run_validate_on(client, child.group_pids, probe_of(config), [1, 2, 3], 2048,
                             None, gpu_indices=(0,))
    assert [(r.level, r.passed, r.skipped) for r in report.rows] == [
        (1, True, False), (2, True, False), (3, False, True)]
    assert report.passed and report.left_awake
    assert "L3: skipped: level 3" in format_table(report)


def test_validate_on_a_running_child_with_a_failed_reload_leaves_it_not_awake(
        sim: SimStarter) -> None:
    child, client, config = sim(faults=("reload_fail",))
    report = run_validate_on(client, child.group_pids, probe_of(config), [2, 1], 2048, None)
    assert not report.passed
    assert not report.left_awake  # the caller must stop it: never serve a failed wake
    assert "not awake after L2" in report.error
    assert len(report.rows) == 1


def test_validate_on_runs_level_3_through_a_restart_callback(sim: SimStarter) -> None:
    child, client, config = sim()
    restarted: list[bool] = []

    def restart() -> None:
        client.sleep(1, timeout=30)  # stands in for stop + cold start
        client.wake(1, timeout=30)
        restarted.append(True)

    report = run_validate_on(client, child.group_pids, probe_of(config), [3], 2048, None,
                             restart=restart)
    assert restarted == [True] and report.passed
    assert report.rows[0].response == "match"


def test_report_round_trips_through_its_dict() -> None:
    report = ValidateReport(model="m", probe="sim", levels=[1, 3], rows=[
        ValidateRow(1, 0.1, 0.2, 100, 10, 100, "match", True, gpu_after_by_gpu={0: 10}),
        ValidateRow(3, response="skipped", skipped=True, reason="x")], baseline="4")
    data = report.to_dict()
    assert data["passed"] is True and data["rows"][0]["gpu_after_by_gpu"] == {"0": 10}
    again = ValidateReport.from_dict(data)
    assert again == report
    assert format_table(again) == format_table(report)


def test_validate_refuses_to_start_when_the_gpu_memory_is_taken(
        sim: SimStarter, tmp_path: Path) -> None:
    _, _, running = sim()  # holds 0.9 of the simulated GPU
    config = sim_config(tmp_path, name="other")
    report = run_validate(config, "other", [1], probe_of(config), None)
    assert report.rows == [] and not report.passed
    assert report.error == ("other cannot start: GPU 0 has 8192 MiB free, needs 73728 MiB "
                            "(0.9 of 81920 MiB) (is another model running?)")
    assert running.daemon.sim_gpu_state == config.daemon.sim_gpu_state
