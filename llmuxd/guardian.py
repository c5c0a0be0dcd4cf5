"""The guardian: a tiny process that kills llmuxd's children when llmuxd dies.

Why a separate process: vLLM children must never outlive the daemon (an orphan
would hold GPU memory forever), also when llmuxd is killed with SIGKILL and runs
no cleanup at all. ``PR_SET_PDEATHSIG`` is no answer: it fires when the *thread*
that forked exits (the supervisor spawns from worker threads), and vLLM's engine
process does not watch its parent. So llmuxd starts this process once and keeps
the only write end of a pipe to it. The guardian reads ``+PGID`` / ``-PGID``
lines; when the pipe reaches EOF without an ``exit`` line (the daemon died,
however it died) it SIGTERMs every registered process group, waits a short
grace, SIGKILLs what is left, and exits.

Run as ``python -m llmuxd.guardian [--grace SECONDS]``; the daemon side is
:class:`Guardian`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import IO

DEFAULT_GRACE = 3.0
_PRUNE_EVERY = 5.0


class GuardianError(OSError):
    """The guardian process cannot be started or reached (an OSError: a failed spawn)."""


# ---------------------------------------------------------------------------
# The daemon side


class Guardian:
    """Handle on the guardian process, held by llmuxd (thread-safe).

    If the guardian dies (it should not), the next register/unregister starts a
    new one and re-registers every live group, so protection is never silently lost.
    """

    def __init__(self, grace: float = DEFAULT_GRACE, python: str | None = None) -> None:
        self.grace = grace
        self._python = python or sys.executable
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._groups: set[int] = set()
        self._closed = False

    @classmethod
    def start_new(cls, grace: float = DEFAULT_GRACE) -> Guardian:
        """Create and start a guardian in one call."""
        return cls(grace=grace).start()

    def start(self) -> Guardian:
        """Start the guardian process (idempotent); returns self."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._spawn_locked()
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def groups(self) -> frozenset[int]:
        """The process groups currently registered."""
        with self._lock:
            return frozenset(self._groups)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def register(self, pgid: int) -> None:
        """Have the guardian kill this process group if the daemon dies."""
        with self._lock:
            self._groups.add(pgid)
            self._send_locked(f"+{pgid}\n")

    def unregister(self, pgid: int) -> None:
        """Forget a group (after it was stopped and reaped)."""
        with self._lock:
            self._groups.discard(pgid)
            if self._closed:
                return
            self._send_locked(f"-{pgid}\n")

    def close(self, timeout: float = 5.0) -> None:
        """Orderly shutdown: tell the guardian to exit without killing anything."""
        with self._lock:
            self._closed = True
            proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.write(b"exit\n")
                proc.stdin.flush()
        except OSError:
            pass
        finally:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def _spawn_locked(self) -> None:
        if self._closed:
            raise GuardianError("the guardian was closed")
        try:
            # stdin=PIPE: the write end stays only here (subprocess makes it
            # close-on-exec, and every child is spawned with close_fds=True).
            # Its own session: a Ctrl-C to the daemon's terminal must not reach it.
            self._proc = subprocess.Popen(
                [self._python, "-m", "llmuxd.guardian", "--grace", str(self.grace)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            raise GuardianError(f"cannot start the guardian: {exc}") from exc

    def _send_locked(self, line: str) -> None:
        if self._closed:
            raise GuardianError("the guardian was closed")
        for attempt in range(2):
            if self._proc is None or self._proc.poll() is not None:
                if self._proc is not None:
                    self._proc.wait()
                self._spawn_locked()
                payload = "".join(f"+{g}\n" for g in sorted(self._groups))
                if line.startswith("-"):
                    payload += line
            else:
                payload = line
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write(payload.encode())
                self._proc.stdin.flush()
                return
            except (BrokenPipeError, ValueError):
                if attempt:
                    raise GuardianError("the guardian keeps dying") from None


# ---------------------------------------------------------------------------
# The guardian process


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_groups(groups: set[int], sig: int) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def kill_groups(groups: set[int], grace: float) -> None:
    """SIGTERM every group, wait up to ``grace`` for them to go, SIGKILL the rest."""
    _signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not any(_group_alive(g) for g in groups):
            return
        time.sleep(0.05)
    _signal_groups({g for g in groups if _group_alive(g)}, signal.SIGKILL)


def serve(stream: IO[bytes], grace: float) -> int:
    """Read commands until ``exit`` (return quietly) or EOF (kill every group)."""
    groups: set[int] = set()
    fd = stream.fileno()
    buffer = b""
    last_prune = time.monotonic()
    while True:
        ready, _, _ = select.select([fd], [], [], _PRUNE_EVERY)
        if time.monotonic() - last_prune >= _PRUNE_EVERY:
            # A group that is gone must not be killed later under a reused id.
            groups = {g for g in groups if _group_alive(g)}
            last_prune = time.monotonic()
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            kill_groups(groups, grace)
            return 0
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("ascii", "replace").strip()
            if line == "exit":
                return 0
            if len(line) > 1 and line[0] in "+-" and line[1:].isdigit():
                pgid = int(line[1:])
                if pgid <= 1:
                    continue
                if line[0] == "+":
                    groups.add(pgid)
                else:
                    groups.discard(pgid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmuxd.guardian",
                                     description="kill llmuxd's children when llmuxd dies")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE,
                        help="seconds between SIGTERM and SIGKILL (default %(default)s)")
    args = parser.parse_args(argv)
    # Only EOF on stdin or an "exit" line may end the guardian: signals meant for
    # the daemon's terminal or unit must not take the protection away first.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    return serve(sys.stdin.buffer, args.grace)


if __name__ == "__main__":
    raise SystemExit(main())
