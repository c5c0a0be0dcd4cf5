"""Keeping the gunicorn front end alive under llmuxd: start, watch, restart, reload.

``frontend.py`` knows how to run one gunicorn process group; this is the policy
around it, run on the supervisor's loop thread (it gets the ``Core`` and a
``mark_ready`` callback, not the supervisor): start it at boot, notice when it
exits and start it again with an exponential backoff (a crash loop must not spin
the loop), and call ``mark_ready`` when it accepts connections, which is when
llmuxd reports READY=1 (or after ``READY_WAIT`` even if it never listens).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog

from llmuxd.core import Core

log = structlog.get_logger("llmuxd.supervisor")

BACKOFF_MAX = 30.0         # seconds between restarts of a front end that keeps dying
STABLE_AFTER = 60.0        # running this long resets the backoff
READY_WAIT = 60.0          # READY=1 even if the front end never listens


class FrontEndKeeper:
    """The front end's handle and restart backoff; every method runs on the loop thread."""

    def __init__(self, core: Core, want: bool, mark_ready: Callable[[], None]) -> None:
        self.core = core
        self.want = want                   # False: llmuxd --no-frontend
        self.mark_ready = mark_ready       # the daemon is ready (READY=1)
        self.handle: Any = None        # llmuxd.frontend.FrontEnd while one runs
        self.next_start = 0.0
        self.backoff = 1.0
        self.failures = 0
        self.started_mono = 0.0

    @property
    def pid(self) -> int | None:
        return self.handle.pid if self.handle is not None else None

    def start(self) -> None:
        from llmuxd.frontend import FrontEnd
        core = self.core
        cfg = core.config
        try:
            fe = FrontEnd(cfg, core.config_path, cfg.daemon.socket)
            fe.start()     # returns at once; called on the loop thread (PDEATHSIG)
        except Exception as exc:
            self.failures += 1
            self.next_start = time.monotonic() + self.backoff
            self.backoff = min(BACKOFF_MAX, self.backoff * 2)
            log.error("frontend_start_failed", error=repr(exc))
            return
        self.handle = fe
        self.started_mono = time.monotonic()
        if fe.pgid is not None and core.guardian is not None:
            with contextlib.suppress(Exception):
                core.guardian.register(fe.pgid)
        log.info("frontend_started", pid=fe.pid, port=cfg.proxy.port)

    def check(self, now: float) -> None:
        """Start it when due, mark the daemon ready once it listens, restart it if it died."""
        core = self.core
        if not self.want:
            return
        fe = self.handle
        if fe is None:
            if now >= self.next_start:
                self.start()
            return
        rc = fe.poll()
        if rc is None:
            if now - self.started_mono > STABLE_AFTER:
                self.backoff = 1.0
            if not core.ready:
                if self.listening():
                    self.mark_ready()
                elif now - self.started_mono > READY_WAIT:
                    log.warning("frontend_not_listening", waited_s=READY_WAIT)
                    self.mark_ready()
            return
        log.error("frontend_exited", pid=fe.pid, code=rc, restart_in_s=self.backoff)
        if fe.pgid is not None:
            # Workers of a dead master would keep the port: the whole group goes.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(fe.pgid, signal.SIGKILL)
            if core.guardian is not None:
                with contextlib.suppress(Exception):
                    core.guardian.unregister(fe.pgid)
        self.handle = None
        self.next_start = now + self.backoff
        self.backoff = min(BACKOFF_MAX, self.backoff * 2)

    def listening(self) -> bool:
        """True once the front end accepts TCP connections on the proxy port."""
        proxy = self.core.config.proxy
        host = proxy.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1" if host != "::" else "::1"
        try:
            with socket.create_connection((host, proxy.port), timeout=0.2):
                return True
        except OSError:
            return False

    def reload(self) -> None:
        """SIGHUP to a running gunicorn: it re-reads the config and restarts its workers."""
        fe = self.handle
        if fe is not None and fe.pid is not None and fe.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(fe.pid, signal.SIGHUP)
