"""sd_notify and logging setup, in-process."""

from __future__ import annotations

import io
import json
import logging
import os
import socket

import structlog

from llmuxd.logsetup import setup_logging
from llmuxd.sdnotify import SdNotify


def test_sd_notify_abstract_socket_and_watchdog_interval():
    name = f"llmux-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        n = SdNotify({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "30000000"})
        assert n.watchdog_interval() == 15.0
        assert n.ready("active: a")
        assert sock.recv(1024) == b"READY=1\nSTATUS=active: a"
        assert n.stopping()
        assert sock.recv(1024) == b"STOPPING=1\nSTATUS=stopping"
    finally:
        sock.close()


def test_sd_notify_without_socket_does_nothing():
    n = SdNotify({})
    assert not n.enabled and not n.ready() and n.watchdog_interval() == 0.0


def test_watchdog_for_another_pid_is_ignored():
    assert SdNotify({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval() == 0


def test_logs_are_json_lines_with_iso_utc_time_and_stdlib_goes_through_too():
    out = io.StringIO()
    setup_logging("info", json_lines=True, stream=out)
    try:
        structlog.get_logger("llmuxd.test").info("switch", from_model="a", total_ms=1.5)
        logging.getLogger("urllib3").warning("plain %s", "stdlib")
        structlog.get_logger("llmuxd.test").debug("hidden")
        lines = [json.loads(x) for x in out.getvalue().splitlines()]
        assert [x["event"] for x in lines] == ["switch", "plain stdlib"]
        assert lines[0]["from_model"] == "a" and lines[0]["level"] == "info"
        assert lines[0]["timestamp"].endswith("Z") and lines[1]["level"] == "warning"
    finally:
        logging.getLogger().handlers[:] = []
        structlog.reset_defaults()
