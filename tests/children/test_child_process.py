"""ChildProcess and its command line: real processes, real signals, real groups."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from llmuxd.child import ChildProcess, SpawnError, build_command, build_env
from llmuxd.config import Config, build_config

from .conftest import Reaper, pid_gone, read_pids, wait_until
from .programs import CHATTY, CRASH, GRANDPARENT, STUBBORN


def make_config(**model: object) -> Config:
    raw_model = {"model_path": "Qwen/Qwen3-14B", "port": 8001, "transport": "tcp", **model}
    return build_config({"models": {"qwen": raw_model}, "vllm_command": "vllm"})


def spawn_py(reaper: Reaper, python: str, log_dir: Path, source: str, *args: str,
             name: str = "m", **kw: object) -> ChildProcess:
    child = ChildProcess.spawn_command([python, "-c", source, *args], dict(os.environ),
                                       name, log_dir, **kw)  # type: ignore[arg-type]
    return reaper.track(child)


# -- command line and environment -------------------------------------------


def test_build_command_is_the_seed_command_plus_host_and_name() -> None:
    cfg = make_config(gpu_memory_utilization=0.85, tensor_parallel_size=2, dtype="bfloat16",
                      extra_args=["--max-model-len", "4096"])
    assert build_command(cfg, cfg.models["qwen"]) == [
        "vllm", "serve", "Qwen/Qwen3-14B", "--host", "127.0.0.1", "--port", "8001",
        "--enable-sleep-mode", "--gpu-memory-utilization", "0.85",
        "--tensor-parallel-size", "2", "--dtype", "bfloat16",
        "--served-model-name", "qwen", "--max-model-len", "4096",
    ]


def test_build_command_without_sleep_mode_and_with_a_multiword_vllm_command() -> None:
    raw = {"models": {"tiny": {"model_path": "/m/tiny", "port": 8002, "transport": "tcp",
                               "enable_sleep_mode": False}},
           "vllm_command": "/opt/venv/bin/python -m vllm.entrypoints.cli.main"}
    cfg = build_config(raw)
    cmd = build_command(cfg, cfg.models["tiny"])
    assert cmd[:6] == ["/opt/venv/bin/python", "-m", "vllm.entrypoints.cli.main", "serve",
                       "/m/tiny", "--host"]
    assert "--enable-sleep-mode" not in cmd
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.9"


def test_build_command_on_a_unix_socket_has_uds_and_no_host_or_port() -> None:
    cfg = make_config(transport="unix")
    cmd = build_command(cfg, cfg.models["qwen"])
    assert cmd[:5] == ["vllm", "serve", "Qwen/Qwen3-14B", "--uds",
                       "/run/llmux/children/qwen.sock"]
    assert "--host" not in cmd and "--port" not in cmd


def test_build_env_sets_dev_mode_gpus_and_lets_model_env_win() -> None:
    cfg = build_config({
        "models": {"qwen": {"model_path": "q", "port": 8001, "tensor_parallel_size": 2,
                            "gpus": [2, 3], "env": {"NO_COLOR": "0", "HF_HOME": "/h"}}},
        "daemon": {"sim_gpu_state": "/tmp/simgpu"},
    })
    env = build_env(cfg, cfg.models["qwen"], base_env={"PATH": "/bin", "VLLM_SERVER_DEV_MODE": "0"})
    assert env["PATH"] == "/bin"
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env["LLMUX_SIM_GPU_STATE"] == "/tmp/simgpu"
    assert env["NO_COLOR"] == "0"  # model.env is applied last
    assert env["HF_HOME"] == "/h"


def test_build_env_defaults_gpus_to_the_first_tensor_parallel_ones() -> None:
    cfg = make_config(tensor_parallel_size=3)
    env = build_env(cfg, cfg.models["qwen"], base_env={})
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    assert "LLMUX_SIM_GPU_STATE" not in env


# -- start, stop, reap ---------------------------------------------------------


def test_spawn_gives_the_child_its_own_group_and_devnull_stdin(
        reaper: Reaper, python: str, tmp_path: Path) -> None:
    child = spawn_py(reaper, python, tmp_path, CHATTY)
    assert child.pgid == child.pid == os.getpgid(child.pid)
    assert os.getpgid(child.pid) != os.getpgid(0)
    assert os.readlink(f"/proc/{child.pid}/fd/0") == "/dev/null"
    assert child.poll() is None
    assert child.wait(0.05) is None
    assert child.group_pids() == [child.pid]


def test_stop_of_a_well_behaved_child_returns_its_sigterm_status(
        reaper: Reaper, python: str, tmp_path: Path) -> None:
    child = spawn_py(reaper, python, tmp_path, CHATTY)
    wait_until(lambda: len(child.tail(10)) >= 6, what="the child's output")
    assert child.stop(grace=30) == -signal.SIGTERM
    assert pid_gone(child.pid)
    assert child.group_pids() == []
    assert child.poll() == -signal.SIGTERM


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(
        reaper: Reaper, python: str, tmp_path: Path) -> None:
    child = spawn_py(reaper, python, tmp_path, STUBBORN)
    wait_until(lambda: "ignoring SIGTERM" in child.tail(5), what="the handler installed")
    assert child.stop(grace=0.5) == -signal.SIGKILL
    assert child.group_pids() == []


def test_stop_is_idempotent(reaper: Reaper, python: str, tmp_path: Path) -> None:
    child = spawn_py(reaper, python, tmp_path, STUBBORN)
    wait_until(lambda: "ignoring SIGTERM" in child.tail(5), what="the handler installed")
    first = child.stop(grace=0.2)
    assert child.stop(grace=0.2) == first == child.kill() == -signal.SIGKILL


def test_kill_ends_the_group_at_once(reaper: Reaper, python: str, tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    child = spawn_py(reaper, python, tmp_path, GRANDPARENT, str(pids_file), "wait")
    wait_until(pids_file.exists, what="the pids file")
    leader, grandchild = read_pids(pids_file)
    reaper.pids.add(grandchild)
    assert sorted(child.group_pids()) == sorted([leader, grandchild])
    assert child.kill() == -signal.SIGKILL
    assert pid_gone(leader) and pid_gone(grandchild)


def test_stop_kills_a_grandchild_left_in_the_group_after_the_leader_exits(
        reaper: Reaper, python: str, tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    child = spawn_py(reaper, python, tmp_path, GRANDPARENT, str(pids_file), "exit")
    wait_until(pids_file.exists, what="the pids file")
    _, grandchild = read_pids(pids_file)
    reaper.pids.add(grandchild)
    wait_until(lambda: child.poll() is not None, what="the leader's exit")
    assert child.poll() == 0
    assert child.group_pids() == [grandchild]  # the grandchild ignores SIGTERM
    assert child.stop(grace=0.5) == 0
    wait_until(lambda: pid_gone(grandchild), what="the grandchild to die")
    assert child.group_pids() == []


def test_stop_waits_for_the_whole_group_not_just_the_leader(
        reaper: Reaper, python: str, tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    child = spawn_py(reaper, python, tmp_path, GRANDPARENT, str(pids_file), "wait")
    wait_until(pids_file.exists, what="the pids file")
    _, grandchild = read_pids(pids_file)
    reaper.pids.add(grandchild)
    # The leader dies of SIGTERM, the grandchild ignores it: only SIGKILL ends it.
    assert child.stop(grace=0.5) == -signal.SIGTERM
    assert pid_gone(grandchild)


def test_an_early_exit_is_reaped_and_its_status_kept(
        reaper: Reaper, python: str, tmp_path: Path) -> None:
    child = spawn_py(reaper, python, tmp_path, CRASH)
    assert child.wait(30) == 3
    assert child.poll() == 3
    assert child.stop(grace=1) == 3
    assert child.tail(1) == ["fatal: no such model"]


def test_spawn_from_a_thread_that_then_exits_keeps_the_child_alive(
        reaper: Reaper, python: str, tmp_path: Path) -> None:
    box: list[ChildProcess] = []
    thread = threading.Thread(target=lambda: box.append(
        spawn_py(reaper, python, tmp_path, CHATTY)))
    thread.start()
    thread.join(30)
    child = box[0]
    wait_until(lambda: len(child.tail(10)) >= 6, what="the child's output")
    assert child.poll() is None
    assert child.stop(grace=30) == -signal.SIGTERM


# -- log file ------------------------------------------------------------------


def test_log_file_gets_a_header_per_start_and_both_streams(
        reaper: Reaper, python: str, tmp_path: Path) -> None:
    log = tmp_path / "qwen.log"

    def printed(times: int) -> bool:
        return log.read_text().splitlines().count("to stderr") == times

    for run in (1, 2):
        child = spawn_py(reaper, python, tmp_path, CHATTY, name="qwen")
        wait_until(lambda: printed(run), what="the child's output")  # noqa: B023
        child.stop(grace=30)
    assert child.log_path == tmp_path / "qwen.log"
    lines = child.log_path.read_text().splitlines()
    headers = [line for line in lines if line.startswith("=== llmux ")]
    assert len(headers) == 2
    assert python in headers[0]
    assert lines.count("line 4") == 2
    assert child.tail(2) == ["line 4", "to stderr"] or child.tail(2) == ["to stderr", "line 4"]
    assert child.tail(0) == []


def test_on_line_gets_every_line_and_the_file_still_gets_them(
        reaper: Reaper, python: str, tmp_path: Path) -> None:
    seen: list[str] = []
    child = spawn_py(reaper, python, tmp_path, CHATTY, on_line=seen.append)
    wait_until(lambda: len(seen) >= 6, what="six lines through on_line")
    child.stop(grace=30)
    assert seen[:5] == [f"line {i}" for i in range(5)]
    assert "to stderr" in seen
    assert child.tail(6)[0] == "line 0"


def test_tail_of_a_missing_log_is_empty(tmp_path: Path) -> None:
    from llmuxd.child import tail_file

    assert tail_file(tmp_path / "nope.log", 5) == []


def test_spawn_of_a_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SpawnError, match="cannot start '/nonexistent/vllm'"):
        ChildProcess.spawn_command(["/nonexistent/vllm", "serve"], {}, "m", tmp_path)
    assert "cannot start" in (tmp_path / "m.log").read_text()


def test_spawn_with_an_unusable_log_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpawnError, match="cannot open log file"):
        ChildProcess.spawn_command(["true"], {}, "m", blocker / "logs")


def test_spawn_uses_build_command_and_build_env(
        reaper: Reaper, python: str, tmp_path: Path) -> None:
    script = tmp_path / "fake_vllm.py"
    out = tmp_path / "argv"
    script.write_text(
        "import json, os, sys\n"
        f"open({str(out)!r}, 'w').write(json.dumps([sys.argv[1:], "
        "os.environ['VLLM_SERVER_DEV_MODE'], os.environ['CUDA_VISIBLE_DEVICES']]))\n")
    cfg = build_config({"models": {"m": {"model_path": "p", "port": 8009}},
                        "vllm_command": f"{python} {script}"})
    child = reaper.track(ChildProcess.spawn(cfg, cfg.models["m"], tmp_path))
    assert child.wait(30) == 0
    import json

    argv, dev, gpus = json.loads(out.read_text())
    assert argv == build_command(cfg, cfg.models["m"])[2:]
    assert (dev, gpus) == ("1", "0")
    assert child.model_name == "m" and child.started_at > 0


def test_kill_cuts_short_a_stop_waiting_out_its_grace_in_another_thread(
        reaper: Reaper, python: str, tmp_path: Path) -> None:
    child = spawn_py(reaper, python, tmp_path, STUBBORN)
    wait_until(lambda: "ignoring SIGTERM" in child.tail(5), what="the handler installed")
    results: list[int] = []
    stopper = threading.Thread(target=lambda: results.append(child.stop(grace=3600)))
    stopper.start()
    wait_until(child._lock.locked, what="the stop to be under way")
    assert child.kill() == -signal.SIGKILL
    stopper.join(60)
    assert results == [-signal.SIGKILL]

