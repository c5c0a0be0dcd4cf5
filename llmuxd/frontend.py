"""The gunicorn front end as a child process of llmuxd.

llmuxd is the one service (one systemd unit), so it starts the front end, notices
when it dies (``poll``) and stops it with the daemon. gunicorn runs in its own
process group, so ``stop`` can take the master and every worker down at once, and
a signal meant for the daemon's terminal does not hit the workers.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmuxd.config import Config

GUNICORN_CONF = str(Path(__file__).parent / "proxy" / "gunicorn_conf.py")
APP = "llmuxd.proxy.app:get_app()"
_PR_SET_PDEATHSIG = 1
# Looked up here, before any fork: the child of a threaded daemon must not dlopen.
_prctl: Any
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child after fork
    """Ask the kernel to SIGTERM gunicorn when the thread that forked it exits."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class FrontEnd:
    """One gunicorn master (and its workers) serving the OpenAI API."""

    def __init__(self, config: Config, config_path: str, socket_path: str,
                 die_with_parent: bool = True) -> None:
        """``die_with_parent``: SIGTERM gunicorn if the *thread* calling start() exits
        (PR_SET_PDEATHSIG), so a SIGKILLed daemon leaves no front end behind. Call
        start() from a long-lived thread, or pass False."""
        self.config = config
        self.config_path = config_path
        self.socket_path = socket_path
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONF, APP]

    def start(self) -> None:
        """Spawn gunicorn in its own process group; returns at once (not when bound)."""
        env = dict(os.environ)
        env["LLMUX_CONFIG"] = str(Path(self.config_path).resolve())
        env["LLMUX_SOCKET"] = str(Path(self.socket_path).resolve())
        self.proc = subprocess.Popen(
            self.command(), env=env, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def pgid(self) -> int | None:
        # start_new_session makes the master the leader of its own group.
        return self.proc.pid if self.proc is not None else None

    def poll(self) -> int | None:
        """The exit code once gunicorn has ended (reaped), else None."""
        return self.proc.poll() if self.proc is not None else None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the master (graceful), SIGKILL the group after ``timeout``, reap."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        # Workers can outlive a killed master; the whole group goes.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return proc.poll()
