"""Fixtures for llmuxctl's tests: a fake control API on a real socket, and a runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .fake_daemon import FakeDaemon

REPO = Path(__file__).resolve().parents[2]


def ctl_env(**extra: str) -> dict[str, str]:
    """The environment llmuxctl runs in: no inherited LLMUX_SOCKET, repo importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("LLMUX_SOCKET", "PYTHONPATH")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def run_ctl(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m llmuxctl ARGS`` as a real process; its output as text."""
    return subprocess.run([sys.executable, "-m", "llmuxctl", *args], cwd=REPO,
                          env=env or ctl_env(), capture_output=True, text=True,
                          timeout=timeout, input=input)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for sockets (AF_UNIX paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ctl-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake(short_dir: Path) -> Iterator[FakeDaemon]:
    with FakeDaemon(str(short_dir / "llmuxd.sock")) as daemon:
        yield daemon
