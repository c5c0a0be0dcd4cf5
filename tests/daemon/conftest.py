"""Fixtures for the daemon's end-to-end tests: a real llmuxd on the simulator."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from llmux_testkit.daemon import DaemonProcess

# 100x faster simulated durations; runtime fault injection on every child.
SIM_ENV = {"LLMUX_SIM_TIME_SCALE": "0.01", "LLMUX_SIM_FAULT_API": "1"}


@pytest.fixture
def make_daemon(request: pytest.FixtureRequest) -> Iterator[Any]:
    """``make_daemon(models, config=..., env=...)`` -> a started DaemonProcess (cleaned up)."""
    started: list[DaemonProcess] = []

    def make(models: dict[str, dict[str, Any]], env: dict[str, str] | None = None,
             **kwargs: Any) -> DaemonProcess:
        d = DaemonProcess(models, env={**SIM_ENV, **(env or {})}, **kwargs)
        started.append(d)
        d.start()
        return d

    yield make
    keep = os.environ.get("LLMUX_TEST_KEEP_LOGS")   # a dir: keep each daemon's log there
    for i, d in enumerate(started):
        try:
            d.__exit__(None, None, None)
        finally:
            if keep:
                os.makedirs(keep, exist_ok=True)
                name = request.node.name.replace("/", "_")
                with contextlib.suppress(OSError):
                    shutil.copy(d.stdout_path, os.path.join(keep, f"{name}-{os.getpid()}-{i}.out"))
            shutil.rmtree(d.tmp, ignore_errors=True)
