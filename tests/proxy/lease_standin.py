"""A stand-in supervisor for the lease listener's tests: what SupervisorBackend uses
of it, over a real LeaseTable, and the listener serving it on a real Unix socket."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmuxd.config import lease_socket_path
from llmuxd.control.errors import model_not_found
from llmuxd.control.lease_listener import LeaseListener, SupervisorBackend
from llmuxd.leases import LeaseTable


class Metrics:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def granted(self, model: str, waited_s: float) -> None:
        self.calls.append(("granted", model))

    def refused(self, model: str, code: str) -> None:
        self.calls.append(("refused", (model, code)))

    def released(self, model: str, status: Any, duration_ms: Any) -> None:
        self.calls.append(("released", (model, status)))


class Policy:
    request_timeout_secs = 5.0


class Config:
    policy = Policy()


class Sup:
    """What SupervisorBackend uses of the supervisor."""

    def __init__(self) -> None:
        self.kicks = 0
        self.leases = LeaseTable(max_queue=8, kick=self._kick)
        self.metrics = Metrics()
        self.config = Config()
        self.aliases = {"alias-a": "model-a"}
        self.reclaimed: list[int] = []

    def _kick(self) -> None:
        self.kicks += 1

    def resolve(self, name: str) -> str:
        name = self.aliases.get(name, name)
        if name not in ("model-a", "model-b"):
            raise model_not_found(name)
        return name

    def reclaim_pid(self, pid: int) -> int:
        self.reclaimed.append(pid)
        return len(self.leases.reclaim_pid(pid))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Sup, str]]:
    """The listener on a real socket in front of ``Sup``: model-a open, model-b closed."""
    sup = Sup()
    sup.leases.add_model("model-a", "http://127.0.0.1:9001", "served-a")
    sup.leases.add_model("model-b", "unix:/run/llmux/b.sock", "model-b")
    sup.leases.open_gate("model-a")
    control = str(tmp_path / "llmuxd.sock")
    listener = LeaseListener(lease_socket_path(control), SupervisorBackend(sup)).start()
    try:
        yield sup, control
    finally:
        listener.close()
    assert not os.path.exists(lease_socket_path(control))
