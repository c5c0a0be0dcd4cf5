"""OpRunner (unit, fakes in addition to the end-to-end tests): how an operation ends.

The loop is played by a queue drained on the test thread: ``done`` runs only for
an attached operation, cleanups always (also when detached or when the work or
``done`` raised), and ``on_end`` (apply_pending) once, only while attached.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest

from llmuxd.config import ModelConfig
from llmuxd.model import ModelRuntime, Operation
from llmuxd.workers import OpRunner


class Loop:
    def __init__(self) -> None:
        self.q: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.ended: list[str] = []

    def post(self, fn: Callable[[], None]) -> None:
        self.q.put(fn)

    def run_one(self) -> None:
        self.q.get(timeout=10)()

    def on_end(self, m: ModelRuntime) -> None:
        self.ended.append(m.name)


def model() -> ModelRuntime:
    return ModelRuntime(ModelConfig(name="a", model_path="sim/model", port=18000))


def test_attached_operation_reports_then_cleans_up_then_ends() -> None:
    loop, m, seen = Loop(), model(), []
    runner = OpRunner(loop.post, loop.on_end)
    op = runner.launch(m, "start", lambda _op: 42,
                       lambda mm, _op, res, err: seen.append(("done", res, err, mm.op)))
    op.on_cleanup(lambda: seen.append(("cleanup",)))
    loop.run_one()
    assert seen == [("done", 42, None, None), ("cleanup",)]
    assert loop.ended == ["a"] and m.op is None


def test_detached_operation_skips_done_but_runs_its_cleanup() -> None:
    loop, m, seen = Loop(), model(), []
    gate = threading.Event()
    runner = OpRunner(loop.post, loop.on_end)

    def work(op: Operation) -> Any:
        assert gate.wait(10)
        return "late"

    op = runner.launch(m, "validate", work, lambda *_a: seen.append("done"))
    op.on_cleanup(lambda: seen.append("cleanup"))
    op.detach()
    m.op = None                     # what stop_model does: the op is no longer m's
    gate.set()
    loop.run_one()
    assert seen == ["cleanup"] and op.cancelled
    assert loop.ended == []         # the operation that replaced it will end the model's turn


@pytest.mark.parametrize("where", ["work", "done"])
def test_cleanup_runs_when_work_or_done_raises(where: str) -> None:
    loop, m, seen = Loop(), model(), []
    runner = OpRunner(loop.post, loop.on_end)

    def work(_op: Operation) -> Any:
        if where == "work":
            raise RuntimeError("boom")
        return 1

    def done(_m: ModelRuntime, _op: Operation, _res: Any, err: BaseException | None) -> None:
        seen.append(("done", type(err).__name__ if err else None))
        if where == "done":
            raise RuntimeError("done failed")

    op = runner.launch(m, "sleep1", work, done)
    op.on_cleanup(lambda: seen.append(("cleanup",)))
    if where == "done":
        with pytest.raises(RuntimeError):
            loop.run_one()
    else:
        loop.run_one()
    assert seen[-1] == ("cleanup",)
    assert seen[0] == ("done", "RuntimeError" if where == "work" else None)
    assert loop.ended == ["a"]
