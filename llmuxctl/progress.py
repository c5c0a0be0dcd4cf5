"""Waiting for a long operation, with a spinner and the elapsed time on a TTY.

The daemon answers a long operation (start, wake, sleep, switch, validate) only once it
is over, so the request runs in a worker thread while the main thread keeps the user
informed and stays interruptible: Ctrl-C leaves at once and says that llmuxd carries
on (closing the connection does not cancel the operation, docs/interfaces.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from llmuxctl.client import SHORT_TIMEOUT, AnswerTimeout, ControlClient, model_path
from llmuxctl.errors import CtlError, Interrupted, OperationFailed

SPINNER = "|/-\\"
FRAME_SECS = 0.1
POLL_SECS = 1.0


class LongOperation:
    """One long request: what to send, how to describe it, and how long to wait."""

    def __init__(self, client: ControlClient, *, path: str, body: Any = None,
                 params: dict[str, Any] | None = None, timeout: float,
                 doing: str, model: str | None = None) -> None:
        self.client = client
        self.path = path
        self.body = body
        self.params = params
        self.timeout = timeout
        self.doing = doing          # "waking qwen-14b"
        self.model = model          # polled for its state while waiting, when given

    def _timed_out(self) -> OperationFailed:
        see = f"llmuxctl status {self.model}" if self.model else "llmuxctl status"
        return OperationFailed(
            f"gave up after {self.timeout:g}s {self.doing}; llmuxd carries on; "
            f"see: {see} (wait longer with --timeout SECS)", code="timeout")

    def _interrupted(self) -> Interrupted:
        see = f"llmuxctl status {self.model}" if self.model else "llmuxctl status"
        return Interrupted(f"interrupted {self.doing}; llmuxd carries on; see: {see}",
                           code="interrupted")

    def run_quietly(self) -> Any:
        """Block until the answer (no TTY): the request's own timeout bounds the wait."""
        try:
            return self.client.post(self.path, self.body, self.params, timeout=self.timeout)
        except AnswerTimeout:
            raise self._timed_out() from None
        except KeyboardInterrupt:
            raise self._interrupted() from None

    def run_with_progress(self, err: TextIO, clock: Callable[[], float] = time.monotonic) -> Any:
        """Run the request in a thread and draw ``| waking qwen 3.2s (waking)`` until done."""
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["value"] = self.client.post(self.path, self.body, self.params,
                                                    timeout=self.timeout)
            except BaseException as exc:  # handed to the main thread, re-raised there
                outcome["error"] = exc

        worker = threading.Thread(target=work, name="llmuxctl-request", daemon=True)
        started = clock()
        worker.start()
        poller = ControlClient(self.client.socket_path) if self.model else None
        state = ""
        next_poll = started + POLL_SECS
        frame = 0
        try:
            while worker.is_alive():
                now = clock()
                if now - started > self.timeout + 5:  # the request's timeout should fire first
                    raise self._timed_out()
                if poller is not None and now >= next_poll:
                    state = self._poll_state(poller)
                    next_poll = clock() + POLL_SECS
                shown = f" ({state})" if state else ""
                err.write(f"\r{SPINNER[frame % len(SPINNER)]} {self.doing} "
                          f"{now - started:.1f}s{shown}\033[K")
                err.flush()
                frame += 1
                worker.join(FRAME_SECS)
        except KeyboardInterrupt:
            raise self._interrupted() from None
        finally:
            err.write("\r\033[K")
            err.flush()
            if poller is not None:
                poller.close()
        if "error" in outcome:
            exc = outcome["error"]
            if isinstance(exc, AnswerTimeout):
                raise self._timed_out() from None
            raise exc
        return outcome.get("value")

    def _poll_state(self, poller: ControlClient) -> str:
        """The model's state for the progress line; '' when the poll itself fails."""
        assert self.model is not None
        try:
            status = poller.get(model_path(self.model), timeout=min(SHORT_TIMEOUT, 5.0))
        except CtlError:
            return ""
        return str(status.get("state", "")) if isinstance(status, dict) else ""
