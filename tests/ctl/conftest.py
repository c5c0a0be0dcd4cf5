"""Fixtures for llmuxctl's tests: a fake control API on a real socket, and a runner."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------
# A user outside the socket's group (the permission tests)

OUTSIDER = "llmuxctl-t"


@dataclass(frozen=True)
class Outsider:
    """A non-root user in no supplementary group, and how to run llmuxctl as it."""

    name: str
    uid: int
    gid: int
    python: tuple[str, ...]
    env: dict[str, str]

    def run_ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
               *self.python, "-m", "llmuxctl", *args]
        return subprocess.run(cmd, cwd="/", env=self.env, capture_output=True, text=True,
                              timeout=timeout)


def _user_python(uid: int, gid: int) -> tuple[tuple[str, ...], dict[str, str]] | str:
    """An interpreter the user can run that imports llmuxctl, or why there is none.

    The venv's python may live under /root (mode 0700, e.g. pyenv): then a system
    python3.11 with the venv's site-packages on PYTHONPATH does the same job.
    """
    purelib = sysconfig.get_paths()["purelib"]
    base_env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/"}
    tried = []
    for python, extra in ((sys.executable, str(REPO)),
                          ("/usr/bin/python3.11", f"{REPO}{os.pathsep}{purelib}")):
        env = {**base_env, "PYTHONPATH": extra}
        probe = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", python, "-s",
             "-c", "import sys; assert sys.version_info[:2] == (3, 11); import llmuxctl.cli"],
            cwd="/", env=env, capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return (python, "-s"), env
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        tried.append(f"{python}: {last}")
    return "; ".join(tried)


@pytest.fixture(scope="session")
def outsider() -> Outsider:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a system user and runs llmuxctl as it")
    for tool in ("useradd", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} to run llmuxctl as a non-root user")
    try:
        pw = pwd.getpwnam(OUTSIDER)
    except KeyError:
        made = subprocess.run(["useradd", "--system", "--no-create-home",
                               "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                               OUTSIDER], capture_output=True, text=True, timeout=60)
        if made.returncode not in (0, 9):  # 9: created meanwhile by a parallel run
            pytest.fail(f"useradd {OUTSIDER} failed: {made.stderr.strip()}")
        pw = pwd.getpwnam(OUTSIDER)
    assert pw.pw_uid != 0
    found = _user_python(pw.pw_uid, pw.pw_gid)
    if isinstance(found, str):
        pytest.skip(f"no python 3.11 that user {OUTSIDER} may run imports llmuxctl "
                    f"(is the repo or the venv unreadable for others?): {found}")
    python, env = found
    return Outsider(OUTSIDER, pw.pw_uid, pw.pw_gid, python, env)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """Like short_dir, but every user may enter it (mode 0755), as /run/llmux is."""
    path = Path(tempfile.mkdtemp(prefix="ctl-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def group_of(path: str | Path) -> str:
    """The name of the group owning ``path`` (the one llmuxctl tells the user to join)."""
    return grp.getgrgid(os.stat(path).st_gid).gr_name
