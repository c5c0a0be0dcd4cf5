"""Fixtures for the child-process tests: tiny real programs, and nothing left behind."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmuxd.child import ChildProcess, pids_in_group
from llmuxd.config import Config
from llmuxd.vllm_client import VllmClient


def wait_until(predicate: Callable[[], object], timeout: float = 30.0,
               what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail the test with ``what`` at the timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie holds nothing and counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def read_pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


class Reaper:
    """Remembers every process group a test started and kills what is left."""

    def __init__(self) -> None:
        self.children: list[ChildProcess] = []
        self.groups: set[int] = set()
        self.pids: set[int] = set()

    def track(self, child: ChildProcess) -> ChildProcess:
        self.children.append(child)
        self.groups.add(child.pgid)
        return child

    def cleanup(self) -> list[int]:
        for child in self.children:
            child.kill()
        left = []
        for pgid in self.groups:
            with_pids = pids_in_group(pgid)
            for pid in with_pids:
                os.kill(pid, signal.SIGKILL)
            left += with_pids
        for pid in self.pids:
            if not pid_gone(pid):
                os.kill(pid, signal.SIGKILL)
                left.append(pid)
        return left


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    r = Reaper()
    yield r
    left = r.cleanup()
    assert not left, f"the test left processes behind: {left}"


@pytest.fixture
def python() -> str:
    return sys.executable


SimStarter = Callable[..., tuple[ChildProcess, VllmClient, Config]]


@pytest.fixture
def sim(reaper: Reaper, tmp_path: Path) -> SimStarter:
    """Start a simulated vLLM child: ``sim(faults=(...), **daemon_overrides)``."""
    from .simfix import sim_config, start_sim

    def start(faults: tuple[str, ...] = (), **kw: object
              ) -> tuple[ChildProcess, VllmClient, Config]:
        config = sim_config(tmp_path, faults=faults, **kw)  # type: ignore[arg-type]
        child, client = start_sim(config, next(iter(config.models.values())))
        reaper.track(child)
        return child, client, config

    return start
