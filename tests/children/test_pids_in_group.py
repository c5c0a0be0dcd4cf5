"""pids_in_group: every live pid of one process group, zombies excluded (real processes).

It runs inside every switch (the sleep's verify, the wake's preflight), so it was
made cheap (issue 11c: getpgid() first, /proc status only for the group's pids);
these pin what it returns, which the speed-up must not change.
"""

from __future__ import annotations

import subprocess
import time

import psutil

from llmuxd.child import pids_in_group


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_the_whole_group_leader_and_its_children_and_nothing_else():
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"],
                            start_new_session=True)
    try:
        _wait(lambda: len(psutil.Process(proc.pid).children()) == 2)
        kids = sorted(c.pid for c in psutil.Process(proc.pid).children())
        assert pids_in_group(proc.pid) == sorted([proc.pid, *kids])
    finally:
        for c in psutil.Process(proc.pid).children():
            c.kill()
        proc.kill()
        proc.wait(10)
    # SIGKILL is delivered at once but the kernel tears a process down after kill()
    # returns: the group empties within moments, not at the call.
    _wait(lambda: pids_in_group(proc.pid) == [])


def test_a_zombie_of_the_group_is_not_counted():
    live = subprocess.Popen(["sleep", "60"], start_new_session=True)
    dead = subprocess.Popen(["true"], start_new_session=True)
    try:
        _wait(lambda: psutil.Process(dead.pid).status() == psutil.STATUS_ZOMBIE)
        assert pids_in_group(dead.pid) == []
        assert pids_in_group(live.pid) == [live.pid]
    finally:
        live.kill()
        live.wait(10)
        dead.wait(10)
