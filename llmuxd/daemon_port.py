"""The daemon's side of the control API's command port (control/port.py).

Each method runs the matching model command (model_commands.py) or read on the
loop thread through the mailbox and waits for it, bounded by ``wait_timeout``.
The supervisor builds one and hands it to the control server; the control API
reaches the daemon only through it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from llmuxd import __version__ as VERSION
from llmuxd import model_commands
from llmuxd.config import Config
from llmuxd.core import Core
from llmuxd.leases import LeaseTable
from llmuxd.metrics import Metrics
from llmuxd.model import ModelRuntime
from llmuxd.model_commands import validate_timeout, wait_timeout
from llmuxd.policy.explain import Explained
from llmuxd.status import model_status
from llmuxd.switching import Switcher
from llmuxd.validate_jobs import ValidateJobs

log = structlog.get_logger("llmuxd.supervisor")

# A validate caller waits this much longer than the job's own deadline, so that it
# gets the job's answer (which says where it got stuck), not a bare timeout.
VALIDATE_ANSWER_MARGIN = 15.0


class DaemonPort:
    """``CommandPort`` over the loop's mailbox, the core and the model commands."""

    def __init__(self, core: Core, ops: Switcher, validations: ValidateJobs,
                 status: Callable[[], dict[str, Any]],
                 reload: Callable[[Config], dict[str, list[str]]],
                 explained: Callable[[], Mapping[str, Explained]] = dict) -> None:
        self._core = core
        self._explained = explained     # the planner's last word per model (status)
        self._ops = ops
        self._validations = validations
        self._status = status
        self._reload = reload

    @property
    def config(self) -> Config:
        return self._core.config

    @property
    def config_path(self) -> str:
        return self._core.config_path

    @property
    def leases(self) -> LeaseTable:
        return self._core.leases

    @property
    def metrics(self) -> Metrics:
        return self._core.metrics

    def health(self) -> dict[str, Any]:
        core = self._core
        state = "stopping" if core.shutdown is not None else "ok"
        return {"status": state, "version": VERSION, "pid": os.getpid(), "ready": core.ready}

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self._core.mailbox.query(self._status)
        return result

    def resolve(self, name: str) -> str:
        return self._core.resolve(name)

    def _status_of(self, m: ModelRuntime) -> dict[str, Any]:
        return model_status(m, self._core.leases.view().get(m.name),
                            self._explained().get(m.name))

    def model_status(self, name: str) -> dict[str, Any]:
        core = self._core
        result: dict[str, Any] = core.mailbox.query(
            lambda: self._status_of(core.model_named(name)))
        return result

    def reload(self, new: Config) -> dict[str, list[str]]:
        result: dict[str, list[str]] = self._core.mailbox.query(lambda: self._reload(new))
        return result

    def _answer(self, m: ModelRuntime) -> dict[str, Any]:
        result: dict[str, Any] = self._core.mailbox.query(lambda: self._status_of(m))
        return result

    def activate(self, name: str, op: str, wait: bool) -> dict[str, Any]:
        core = self._core
        m = core.mailbox.call(lambda fut: model_commands.activate(core, name, fut, wait),
                              wait_timeout(core.config, name, op))
        return self._answer(m)

    def sleep(self, name: str, level: int, wait: bool) -> dict[str, Any]:
        core, ops = self._core, self._ops
        m = core.mailbox.call(
            lambda fut: model_commands.sleep(core, ops, name, level, fut, wait),
            wait_timeout(core.config, name, "sleep"))
        return self._answer(m)

    def kill(self, name: str, wait: bool) -> dict[str, Any]:
        core, ops = self._core, self._ops
        m = core.mailbox.call(lambda fut: model_commands.kill(core, ops, name, fut, wait),
                              wait_timeout(core.config, name, "kill"))
        return self._answer(m)

    def validate(self, name: str, levels: list[int], verbose: bool) -> dict[str, Any]:
        core = self._core
        report: dict[str, Any] = core.mailbox.call(
            lambda fut: self._validations.request(name, list(levels), fut, verbose),
            validate_timeout(core.config, name, len(levels)) + VALIDATE_ANSWER_MARGIN)
        return report

    def reclaim_pid(self, pid: int) -> int:
        """Drop the leases of a dead client pid (any thread)."""
        gone = self._core.leases.reclaim_pid(pid)
        if gone:
            log.warning("leases_reclaimed", pid=pid, count=len(gone),
                        models=sorted({lease.model for lease in gone}))
        return len(gone)
