"""Operations in worker threads: the one place an operation ends, whatever the path.

The loop never blocks on a child (the gunicorn-arbiter lesson): each slow step
(preflight, start, wake, sleep, stop, validate) is an ``Operation`` whose work
runs in a thread of its own and reports back with a callable posted to the loop.
When that report runs, on the loop thread:

1. ``done`` gets the result, but only while the operation is still the model's
   (``m.op is op``); one detached meanwhile (a stop cancelled a start, a kill
   cut a validate short, a shutdown took the child) is not reported;
2. the operation's own cleanups run, always: reported, failed or detached;
3. if it was still the model's operation, ``on_end(m)`` runs: the supervisor
   applies a pending config there (a reload that changed or removed the model
   while it was busy), so no completion path has to remember to.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

import structlog

from llmuxd.model import ModelRuntime, Operation

log = structlog.get_logger("llmuxd.supervisor")

Work = Callable[[Operation], Any]
Done = Callable[[ModelRuntime, Operation, Any, "BaseException | None"], None]


class OpRunner:
    """Launches operations in worker threads and keeps the set still running."""

    def __init__(self, post: Callable[[Callable[[], None]], None],
                 on_end: Callable[[ModelRuntime], None]) -> None:
        self._post = post
        self._on_end = on_end
        self._ids = itertools.count(1)
        self._workers: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def launch(self, m: ModelRuntime, kind: str, work: Work, done: Done) -> Operation:
        """Run ``work`` in a worker thread as ``m``'s one operation (loop thread)."""
        op = Operation(op_id=next(self._ids), kind=kind)
        m.op = op

        def body() -> None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = work(op)
            except BaseException as exc:  # reported to the loop, which decides
                error = exc
            op.ended.set()
            self._post(lambda: self._ended(m, op, done, result, error))
            with self._lock:
                self._workers.discard(threading.current_thread())

        t = threading.Thread(target=body, name=f"op-{kind}-{m.name}", daemon=True)
        with self._lock:
            self._workers.add(t)
        t.start()
        return op

    def _ended(self, m: ModelRuntime, op: Operation, done: Done, result: Any,
               error: BaseException | None) -> None:
        """The report, on the loop thread: done (if attached), cleanups, on_end."""
        attached = m.op is op
        try:
            if attached:
                m.op = None
                done(m, op, result, error)
            else:
                log.debug("op_result_ignored", model=m.name, op=op.kind)
        finally:
            cleanups, op.cleanups = op.cleanups, []
            for fn in cleanups:
                try:
                    fn()
                except Exception:
                    log.exception("op_cleanup_failed", model=m.name, op=op.kind)
            if attached:
                self._on_end(m)

    def running(self) -> list[threading.Thread]:
        """The operation threads still running (shutdown waits for them)."""
        with self._lock:
            return list(self._workers)
