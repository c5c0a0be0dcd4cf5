"""sd_notify and logging setup, in-process."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading

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


def test_sd_notify_to_a_socket_nobody_reads_gives_up_instead_of_hanging():
    """The loop thread sends these: a full notify queue must not stop it for good."""
    name = f"llmux-test-full-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    results: list[bool] = []
    try:
        n = SdNotify({"NOTIFY_SOCKET": "@" + name})
        # net.unix.max_dgram_qlen datagrams fit (10 by default); then the queue is full
        with open("/proc/sys/net/unix/max_dgram_qlen") as f:
            fit = int(f.read())
        sender = threading.Thread(target=lambda: results.extend(n.watchdog()
                                                                for _ in range(fit + 2)))
        sender.start()
        sender.join(60)
        assert not sender.is_alive(), "sd_notify blocked on a full queue"
        assert results[0] and not results[-1]
        assert sock.recv(1024) == b"WATCHDOG=1"    # what fitted was delivered
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
