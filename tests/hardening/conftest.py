"""Fixtures for the hardening tests: a real llmuxd on the simulator, cleaned up."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from llmux_testkit.daemon import DaemonProcess

SIM_ENV = {"LLMUX_SIM_TIME_SCALE": "0.01"}


@pytest.fixture
def make_daemon() -> Iterator[Any]:
    """``make_daemon(models, config=..., env=...)`` -> a started DaemonProcess."""
    started: list[DaemonProcess] = []

    def make(models: dict[str, dict[str, Any]], env: dict[str, str] | None = None,
             **kwargs: Any) -> DaemonProcess:
        d = DaemonProcess(models, env={**SIM_ENV, **(env or {})}, **kwargs)
        started.append(d)
        d.start()
        return d

    yield make
    for d in started:
        try:
            d.__exit__(None, None, None)
        finally:
            shutil.rmtree(d.tmp, ignore_errors=True)
