"""The guardian: children die with the daemon, also when the daemon gets kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from llmuxd.child import ChildProcess
from llmuxd.guardian import Guardian

from .conftest import Reaper, pid_gone, read_pids, wait_until
from .programs import CHATTY, GRANDPARENT

# A stand-in for llmuxd: starts a guardian, spawns children from a worker thread
# (which then exits), writes every pid to a JSON file, and waits to be killed.
DAEMON = r"""
import json, os, signal, sys, threading, time
from pathlib import Path
from llmuxd.child import ChildProcess
from llmuxd.guardian import Guardian

out, log_dir, program, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
guardian = Guardian(grace=0.5).start()
first_guardian = guardian.pid
children = []

def spawn(i):
    pids_file = Path(f"{out}.{i}")
    child = ChildProcess.spawn_command(
        [sys.executable, "-c", program, str(pids_file), "stubborn"], dict(os.environ),
        f"m{i}", log_dir, guardian=guardian)
    while not pids_file.exists():
        time.sleep(0.02)
    children.append([int(p) for p in pids_file.read_text().split()])
    return child

def in_thread(i):
    box = []
    t = threading.Thread(target=lambda: box.append(spawn(i)))
    t.start()
    t.join()
    return box[0]

first = in_thread(0)
if mode == "restart-guardian":
    os.kill(guardian.pid, signal.SIGKILL)
    while guardian.alive():
        time.sleep(0.02)
second = in_thread(1)
if mode == "unregister":
    guardian.unregister(second.pgid)
result = {"guardian": guardian.pid, "first_guardian": first_guardian,
          "children": children}
(out.parent / "tmp.json").write_text(json.dumps(result))
os.rename(out.parent / "tmp.json", out)
while True:
    time.sleep(1)
"""


@pytest.fixture
def daemon_script(tmp_path: Path) -> Path:
    path = tmp_path / "fake_llmuxd.py"
    path.write_text(DAEMON)
    return path


@pytest.fixture
def daemons() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def start_daemon(daemons: list[subprocess.Popen[bytes]], reaper: Reaper, script: Path,
                 tmp_path: Path, mode: str) -> dict:
    out = tmp_path / "state.json"
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(tmp_path / "logs"),
                             GRANDPARENT, mode], start_new_session=True)
    daemons.append(proc)
    wait_until(lambda: out.exists() or proc.poll() is not None, what="the daemon's children")
    assert proc.poll() is None, "the stand-in daemon died"
    state = json.loads(out.read_text())
    for leader, grandchild in state["children"]:
        reaper.pids.update({leader, grandchild})
    reaper.pids.update({state["guardian"], state["first_guardian"]})
    return state


def test_kill_9_of_the_daemon_kills_every_child_and_grandchild(
        daemons: list, reaper: Reaper, daemon_script: Path, tmp_path: Path) -> None:
    state = start_daemon(daemons, reaper, daemon_script, tmp_path, "plain")
    pids = [p for pair in state["children"] for p in pair]
    assert len(pids) == 4 and not any(pid_gone(p) for p in pids)
    daemons[0].send_signal(signal.SIGKILL)
    daemons[0].wait(30)
    # Leaders and grandchildren all ignore SIGTERM: this also proves the SIGKILL step.
    wait_until(lambda: all(pid_gone(p) for p in pids), what="every child pid to go")
    wait_until(lambda: pid_gone(state["guardian"]), what="the guardian to exit")


def test_a_restarted_guardian_still_protects_groups_registered_before_its_death(
        daemons: list, reaper: Reaper, daemon_script: Path, tmp_path: Path) -> None:
    state = start_daemon(daemons, reaper, daemon_script, tmp_path, "restart-guardian")
    assert state["guardian"] != state["first_guardian"]
    pids = [p for pair in state["children"] for p in pair]
    daemons[0].send_signal(signal.SIGKILL)
    wait_until(lambda: all(pid_gone(p) for p in pids), what="every child pid to go")
    wait_until(lambda: pid_gone(state["guardian"]), what="the guardian to exit")


def test_an_unregistered_group_is_left_alone(
        daemons: list, reaper: Reaper, daemon_script: Path, tmp_path: Path) -> None:
    state = start_daemon(daemons, reaper, daemon_script, tmp_path, "unregister")
    daemons[0].send_signal(signal.SIGKILL)
    # The guardian kills first, then exits: once it is gone the verdict is final.
    wait_until(lambda: pid_gone(state["guardian"]), what="the guardian to exit")
    registered, unregistered = state["children"]
    assert all(pid_gone(p) for p in registered)
    assert not any(pid_gone(p) for p in unregistered)
    os.killpg(unregistered[0], signal.SIGKILL)
    wait_until(lambda: all(pid_gone(p) for p in unregistered), what="the cleanup")


def test_close_ends_the_guardian_without_killing_children(
        reaper: Reaper, python: str, tmp_path: Path) -> None:
    guardian = Guardian(grace=0.5).start()
    guardian_pid = guardian.pid
    assert guardian_pid is not None
    reaper.pids.add(guardian_pid)
    child = reaper.track(ChildProcess.spawn_command(
        [python, "-c", CHATTY], dict(os.environ), "m", tmp_path, guardian=guardian))
    assert guardian.groups == {child.pgid}
    guardian.close()
    assert pid_gone(guardian_pid)
    assert child.poll() is None
    child.stop(grace=30)


def test_stop_unregisters_the_group(reaper: Reaper, python: str, tmp_path: Path) -> None:
    guardian = Guardian(grace=0.5).start()
    try:
        child = reaper.track(ChildProcess.spawn_command(
            [python, "-c", CHATTY], dict(os.environ), "m", tmp_path, guardian=guardian))
        assert child.pgid in guardian.groups
        child.stop(grace=30)
        assert guardian.groups == frozenset()
        assert guardian.alive()
    finally:
        guardian.close()


def test_the_guardian_ignores_sigterm_and_sigint_meant_for_the_daemon(
        reaper: Reaper, python: str, tmp_path: Path) -> None:
    guardian = Guardian(grace=0.5).start()
    try:
        child = reaper.track(ChildProcess.spawn_command(
            [python, "-c", CHATTY], dict(os.environ), "m", tmp_path, guardian=guardian))
        assert guardian.pid is not None
        wait_until(lambda: len(child.tail(10)) >= 6, what="the guardian's child output")
        # Wait for the guardian to install its handlers (it has then read no command yet
        # but is blocked in select); its signal mask is visible in /proc.
        wait_until(lambda: _ignores(guardian.pid, signal.SIGTERM), what="SIGTERM ignored")
        os.kill(guardian.pid, signal.SIGTERM)
        os.kill(guardian.pid, signal.SIGINT)
        assert guardian.alive()
        child.stop(grace=30)
    finally:
        guardian.close()


def _ignores(pid: int | None, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


def test_read_pids_helper_reads_pairs(tmp_path: Path) -> None:
    (tmp_path / "p").write_text("12 34\n")
    assert read_pids(tmp_path / "p") == [12, 34]


def test_spawn_with_a_closed_guardian_fails_cleanly_and_leaves_no_child(
        reaper: Reaper, python: str, tmp_path: Path) -> None:
    from llmuxd.guardian import GuardianError

    guardian = Guardian(grace=0.5).start()
    guardian.close()
    marker = tmp_path / "started"
    source = f"open({str(marker)!r}, 'w').close()\nimport time\nwhile True: time.sleep(1)\n"
    with pytest.raises(GuardianError, match="closed"):
        ChildProcess.spawn_command([python, "-c", source], dict(os.environ), "m", tmp_path,
                                   guardian=guardian)
    # spawn killed and reaped the child before raising: no process runs its source.
    left = [p.pid for p in psutil.process_iter(["cmdline", "status"])
            if p.info["status"] != psutil.STATUS_ZOMBIE
            and any(str(marker) in part for part in (p.info["cmdline"] or []))]
    assert left == []
