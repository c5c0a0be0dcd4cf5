"""The command port: everything the control API may ask of the daemon, and nothing more.

The routes (commands.py) parse and check a request and then call one of these;
they never see the supervisor, the model table or the loop. The daemon's side
is ``llmuxd.daemon_port.DaemonPort``; a test can hand ``dispatch`` any object of
this shape. Methods that change or read model state run on the loop thread and
may wait (bounded); the lease table is the one part used directly (its fast path
must not wait for the loop).
"""

from __future__ import annotations

from typing import Any, Protocol

from llmuxd.config import Config
from llmuxd.leases import LeaseTable
from llmuxd.metrics import Metrics


class CommandPort(Protocol):
    """What ``dispatch`` and the routes need from the daemon."""

    @property
    def config(self) -> Config: ...

    @property
    def config_path(self) -> str: ...

    @property
    def leases(self) -> LeaseTable: ...

    @property
    def metrics(self) -> Metrics: ...

    def health(self) -> dict[str, Any]:
        """``GET /v1/health``: answered without the loop (it may be busy)."""
        ...

    def status(self) -> dict[str, Any]:
        """The ``/v1/status`` document."""
        ...

    def resolve(self, name: str) -> str:
        """A model's own name for a name or alias, or model_not_found."""
        ...

    def model_status(self, name: str) -> dict[str, Any]:
        """One model's ``ModelStatus``."""
        ...

    def reload(self, new: Config) -> dict[str, list[str]]:
        """Apply a checked config: the added, removed and changed models."""
        ...

    def activate(self, name: str, op: str, wait: bool) -> dict[str, Any]:
        """start / wake / switch (``op``); the model's status once ACTIVE (or at once)."""
        ...

    def sleep(self, name: str, level: int, wait: bool) -> dict[str, Any]:
        """Sleep at ``level`` (3: stop); the model's status once it left (or at once)."""
        ...

    def kill(self, name: str, wait: bool) -> dict[str, Any]:
        """SIGKILL the model's process group; its status once stopped (or at once)."""
        ...

    def validate(self, name: str, levels: list[int], verbose: bool) -> dict[str, Any]:
        """Run validate on a supervised model; the report."""
        ...

    def reclaim_pid(self, pid: int) -> int:
        """Drop the leases of a dead client pid; how many."""
        ...
