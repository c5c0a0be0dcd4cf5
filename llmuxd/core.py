"""The daemon's shared state and its mailbox, owned by the supervisor's loop thread.

``Mailbox`` is how every other thread talks to the loop (signal handlers, control
connections, worker threads): they put a callable on it and, when they need an
answer, wait on a Future with a timeout. Only the loop runs those callables.

``Core`` is what the loop owns: the config, the model table (``ModelRuntime`` per
model), the lease table, the GPU probe and the shutdown flag. The layers above
(switching, planner, lifecycle, validate jobs, commands) get the ``Core`` and the
parts they act through, never the ``Supervisor``: the supervisor wires them, they
do not reach back into it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from llmuxd.config import Config, ModelConfig
from llmuxd.errors import ApiError, model_not_found, shutting_down
from llmuxd.leases import LeaseTable
from llmuxd.metrics import Metrics
from llmuxd.model import ModelRuntime
from llmuxd.sdnotify import SdNotify


class Mailbox:
    """The loop's event queue: ``post``/``kick`` from anywhere, ``call`` to wait for an answer."""

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.closed = False          # the loop has ended: calls are refused at once

    def kick(self) -> None:
        """Wake the loop (something changed: a waiter queued, a drain hit 0)."""
        self.events.put(None)

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (from workers; no answer expected)."""
        self.events.put(fn)

    def signal(self, signum: int) -> None:
        """Signal handler body: only queue it (SimpleQueue.put is reentrant)."""
        self.events.put(("signal", signum))

    def call(self, fn: Callable[[Future[Any]], None], timeout: float) -> Any:
        """Run ``fn(future)`` on the loop thread; wait for the future up to ``timeout``.

        ``fn`` may resolve the future at once or keep it until an operation ends.
        """
        fut: Future[Any] = Future()
        if self.closed:
            raise shutting_down()
        self.events.put((fn, fut))
        try:
            return fut.result(timeout)
        except FutureTimeout:
            raise ApiError("timeout", f"no answer within {timeout:g}s") from None

    def query(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Run a read-only ``fn()`` on the loop thread and return its value."""
        def run(fut: Future[Any]) -> None:
            fut.set_result(fn())
        return self.call(run, timeout)


@dataclass
class ShutdownState:
    """A shutdown in progress: why, its deadlines, and the thread stopping the children."""

    reason: str
    drain_deadline: float
    hard_deadline: float
    stage: str = "drain"      # drain -> stopping -> done
    stopper: threading.Thread | None = None
    exit_code: int = 0


class Core:
    """The loop thread's state: config, model table, lease table, probe, shutdown."""

    def __init__(self, config: Config, config_path: str, mailbox: Mailbox, *,
                 probe: Any = None, notifier: SdNotify | None = None,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.mailbox = mailbox
        self.leases = LeaseTable(config.daemon.max_queue_per_model, mailbox.kick)
        self.models: dict[str, ModelRuntime] = {}
        self.probe = probe
        self.notifier = notifier or SdNotify()
        self.metrics = metrics or Metrics()
        self.guardian: Any = None
        self.shutdown: ShutdownState | None = None
        self.costs: dict[tuple[str | None, str], float] = {}   # learned switch seconds
        self.started_at = time.time()
        self.ready = False
        for mc in config.models.values():
            self.add_model(mc)

    def kick(self) -> None:
        self.mailbox.kick()

    def post(self, fn: Callable[[], None]) -> None:
        self.mailbox.post(fn)

    def add_model(self, mc: ModelConfig) -> ModelRuntime:
        m = ModelRuntime(mc)
        self.models[mc.name] = m
        self.leases.add_model(mc.name, mc.upstream, mc.name)
        return m

    def resolve(self, name: str) -> str:
        """The model's own name for ``name`` (a name or alias), or model_not_found."""
        mc = self.config.resolve_model(name)
        if mc is None:
            raise model_not_found(name)
        return mc.name

    def model_named(self, name: str) -> ModelRuntime:
        """The live model called ``name`` (not an alias), or model_not_found."""
        m = self.models.get(name)
        if m is None or m.removed:
            raise model_not_found(name)
        return m
