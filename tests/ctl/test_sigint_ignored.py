"""Ctrl-C works even when llmuxctl starts with SIGINT ignored.

A non-interactive shell starts background jobs (``llmuxctl wake x &``) with SIGINT
ignored, and Python keeps an inherited SIG_IGN: KeyboardInterrupt never came, so
Ctrl-C (or ``kill -INT``) did nothing. llmuxctl installs its handler explicitly.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys

from llmuxctl.cli import main

from .conftest import REPO, ctl_env
from .fake_daemon import FakeDaemon
from .test_cli_fake import Lines, sock, wait_for


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "llmuxctl", *args], cwd=REPO,
                            env=ctl_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1, preexec_fn=_ignore_sigint)


def test_sigint_ends_a_wait_with_130_though_started_ignored(fake: FakeDaemon) -> None:
    fake.state.op_delay = 60.0
    proc = _popen(*sock(fake), "wake", "beta")
    try:
        wait_for(lambda: any(r[1].startswith("/v1/models/beta/wake")
                             for r in fake.state.requests), what="the wake request")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "interrupted waking beta" in err


def test_sigint_ends_logs_follow_though_started_ignored(fake: FakeDaemon) -> None:
    proc = _popen(*sock(fake), "logs", "alpha", "-f", "-n", "1")
    try:
        assert proc.stdout is not None
        assert Lines(proc.stdout).next() == "alpha line 100"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


class _CtrlCOnFirstWrite(io.StringIO):
    """stdout on which Ctrl-C arrives while the first lines are being printed."""

    def write(self, s: str) -> int:
        raise KeyboardInterrupt


def test_ctrl_c_during_the_first_lines_of_logs_follow_also_ends_it_with_0(
        fake: FakeDaemon) -> None:
    """CI caught the race: SIGINT right after the first line came out, while llmuxctl
    was still printing the initial tail (outside the follow loop), exited 130."""
    err = io.StringIO()
    code = main([*sock(fake), "logs", "alpha", "-f", "-n", "1"], out=_CtrlCOnFirstWrite(),
                err=err)
    assert (code, err.getvalue()) == (0, "")
