"""A real llmuxd shared by the control API fuzz cases of one module."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from llmux_testkit.daemon import DaemonProcess, sim_model


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    config = {"daemon": {"idle_timeout_secs": 2.0, "read_timeout_secs": 2.0,
                         "drain_timeout_secs": 2.0},
              "policy": {"request_timeout_secs": 5.0}}
    d = DaemonProcess({"a": sim_model(aliases=["alpha"]), "b": sim_model()}, config=config,
                      env={"LLMUX_SIM_TIME_SCALE": "0.01"})
    try:
        d.start()
        yield d
    finally:
        d.__exit__(None, None, None)
        shutil.rmtree(d.tmp, ignore_errors=True)
