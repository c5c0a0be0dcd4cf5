"""Under systemd (JOURNAL_STREAM names our stdout), each log line carries its priority.

journald reads a ``<N>`` prefix (SyslogLevelPrefix=yes, the default) as the line's
syslog priority, so ``journalctl -p warning`` shows warnings and errors only.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
import structlog

from llmux_testkit.daemon import DaemonProcess, sim_model
from llmuxd.logsetup import setup_logging


def _journal_stream(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def _log_all(path: Path) -> list[str]:
    log = structlog.get_logger("llmuxd.test")
    log.debug("d_event")
    log.info("i_event")
    log.warning("w_event")
    log.error("e_event")
    logging.getLogger("urllib3.test").warning("stdlib_warning")
    return path.read_text().splitlines()


def test_each_level_gets_its_syslog_priority_under_journald(tmp_path, monkeypatch,
                                                             restore_logging):
    out = tmp_path / "out"
    with open(out, "w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", _journal_stream(out))
        setup_logging("debug", stream=stream)
        lines = _log_all(out) if stream.flush() is None else []
    prefixes = {re.search(r'"event": "(\w+)"', line).group(1): line[:3] for line in lines}
    assert prefixes == {"d_event": "<7>", "i_event": "<6>", "w_event": "<4>",
                        "e_event": "<3>", "stdlib_warning": "<4>"}


def test_no_prefix_when_stdout_is_not_the_journal(tmp_path, monkeypatch, restore_logging):
    out = tmp_path / "out"
    other = tmp_path / "other"
    other.write_text("")
    with open(out, "w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", _journal_stream(other))  # inherited, stale
        setup_logging("debug", stream=stream)
        lines = _log_all(out) if stream.flush() is None else []
    assert lines and all(line.startswith("{") for line in lines)
    monkeypatch.delenv("JOURNAL_STREAM")
    setup_logging("debug", stream=io.StringIO())  # no fileno: no prefix, no crash


def test_a_real_daemon_marks_its_error_lines_err(tmp_path):
    """A metrics port already in use is logged at error level: ``<3>`` on its line."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    tmp = Path(tempfile.mkdtemp(prefix="llmuxd-journal-"))
    out = tmp / "llmuxd.out"
    out.write_text("")
    d = DaemonProcess({"a": sim_model()}, config={"metrics_port": busy.getsockname()[1]},
                      env={"JOURNAL_STREAM": _journal_stream(out)}, tmp=tmp,
                      log_level="info")
    try:
        with d:
            deadline = time.monotonic() + 30
            while "metrics_listen_failed" not in out.read_text():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            lines = out.read_text().splitlines()
    finally:
        busy.close()
        shutil.rmtree(tmp, ignore_errors=True)
    failed = [ln for ln in lines if "metrics_listen_failed" in ln]
    assert failed and all(ln.startswith("<3>") for ln in failed)
    infos = [ln for ln in lines if '"level": "info"' in ln]
    assert infos and all(ln.startswith("<6>") for ln in infos)
