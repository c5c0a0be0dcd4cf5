"""sd_notify without libsystemd: one datagram per message to $NOTIFY_SOCKET.

Why hand-written: the protocol is a single sendto() on an AF_UNIX datagram
socket (``@`` means the abstract namespace), and a missing or broken socket must
never take the daemon down, so every send is best effort.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("llmuxd.sdnotify")

SEND_TIMEOUT = 1.0          # seconds one message may wait for room in the queue


class SdNotify:
    """Talks to systemd when NOTIFY_SOCKET is set; does nothing otherwise."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()
        elif path:
            self.address = path
        self._watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        wd_pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not wd_pid or wd_pid == str(os.getpid())):
            self._watchdog_usec = int(usec)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> float:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec), 0 when not asked."""
        return self._watchdog_usec / 2e6 if self._watchdog_usec else 0.0

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # The supervisor's loop thread sends these: when the receiver's queue is
                # full (it holds net.unix.max_dgram_qlen, 10 by default), wait a little,
                # then give this message up rather than stop the loop until someone reads.
                self._sock.settimeout(SEND_TIMEOUT)
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc))
            return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", f"STATUS={status}") if status else self.send("READY=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")

    def reloading(self) -> bool:
        return self.send("RELOADING=1")
