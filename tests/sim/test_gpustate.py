"""The simulated-GPU directory: capacity checks, dead processes, the probe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmuxd.gpu.sim import SimGpuProbe
from vllmsim.gpustate import GpuState, InsufficientMemory


@pytest.fixture
def state(tmp_path: Path) -> GpuState:
    s = GpuState(tmp_path / "gpus")
    s.init(2, 1000, "Test GPU")
    return s


def test_init_and_empty_snapshot(state: GpuState) -> None:
    assert [(g.index, g.total_mib, g.used_mib, g.name) for g in state.snapshot()] == [
        (0, 1000, 0, "Test GPU"), (1, 1000, 0, "Test GPU")]


def test_allocate_counts_other_processes(state: GpuState) -> None:
    me, pgid = os.getpid(), os.getpgid(0)
    state.allocate(me, pgid, {0: 600})
    assert state.usage_by_pid() == {me: {0: 600}}
    assert [g.used_mib for g in state.snapshot()] == [600, 0]
    # growing our own entry only needs the delta
    state.allocate(me, pgid, {0: 900})
    assert state.free_mib(0) == 100


def test_allocate_refuses_what_does_not_fit(state: GpuState) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state.set_usage(child.pid, os.getpgid(child.pid), {0: 700})
        with pytest.raises(InsufficientMemory) as exc:
            state.allocate(os.getpid(), os.getpgid(0), {0: 400})
        assert (exc.value.index, exc.value.free_mib, exc.value.wanted_mib) == (0, 300, 400)
        assert os.getpid() not in state.usage_by_pid()
    finally:
        child.kill()
        child.wait()


def test_entries_of_dead_processes_do_not_count(state: GpuState) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    pgid = os.getpgid(child.pid) if child.poll() is None else os.getpgid(0)
    state.set_usage(child.pid, pgid, {1: 800})
    child.wait()
    assert child.pid not in state.usage_by_pid()
    assert [g.used_mib for g in state.snapshot()] == [0, 0]
    assert not (state.procs / f"{child.pid}.json").exists(), "dead entry not swept"


def test_an_entry_whose_pid_was_reused_does_not_count(state: GpuState) -> None:
    # our own pid is alive, but the recorded group is not ours: a reused pid
    state.set_usage(os.getpid(), os.getpgid(0) + 12345, {0: 500})
    assert state.usage_by_pid() == {}


def test_clear_frees_the_memory(state: GpuState) -> None:
    state.set_usage(os.getpid(), os.getpgid(0), {0: 100, 1: 200})
    state.clear(os.getpid())
    assert state.usage_by_pid() == {}


def test_probe_reads_the_directory(state: GpuState) -> None:
    state.set_usage(os.getpid(), os.getpgid(0), {1: 250})
    probe = SimGpuProbe(state.dir)
    assert probe.name == "sim"
    assert [(g.index, g.used_mib, g.free_mib) for g in probe.gpus()] == [(0, 0, 1000),
                                                                        (1, 250, 750)]
    assert probe.usage_by_pid() == {os.getpid(): {1: 250}}


def test_probe_on_an_uninitialised_directory_sees_no_gpu(tmp_path: Path) -> None:
    probe = SimGpuProbe(tmp_path / "nothing")
    assert (probe.gpus(), probe.usage_by_pid()) == ([], {})


def test_ensure_uses_env_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMUX_SIM_GPUS", "3")
    monkeypatch.setenv("LLMUX_SIM_GPU_MIB", "2048")
    s = GpuState(tmp_path / "g")
    s.ensure()
    assert [(g.index, g.total_mib) for g in s.snapshot()] == [(0, 2048), (1, 2048), (2, 2048)]
