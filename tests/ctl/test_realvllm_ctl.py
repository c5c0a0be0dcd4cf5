"""``llmuxctl validate`` (and the model commands) against a real ``vllm serve`` under llmuxd.

Marker realvllm: skipped unless LLMUX_REALVLLM=1, an error when that is set but the
tier built by tests/realvllm/setup.sh is missing (realvllm/fixtures.py's policy).
CPU vLLM runs without --enable-sleep-mode and the probe is "none": what is checked
is the seed's contract, the same answer before and after each sleep/wake cycle.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmux_testkit.daemon import DaemonProcess, free_port

from .conftest import run_ctl

pytestmark = pytest.mark.realvllm


@pytest.fixture(scope="module")
def real_daemon() -> Iterator[DaemonProcess]:
    from realvllm.fixtures import llmuxd_model_table, require_realvllm

    vllm, model = require_realvllm()
    tmp = Path(tempfile.mkdtemp(prefix="ctl-r-", dir="/tmp"))
    models = {"tiny": llmuxd_model_table(model, free_port(), tmp / "work", sleep_level=1)}
    config = {"vllm_command": str(vllm),
              "daemon": {"gpu_probe": "none", "startup_timeout_secs": 300.0,
                         "sleep_timeout_secs": 120.0, "wake_timeout_secs": 120.0,
                         "stop_timeout_secs": 15.0}}
    try:
        with DaemonProcess(models, config=config, tmp=tmp) as d:
            yield d
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_validate_passes_against_real_vllm(real_daemon: DaemonProcess) -> None:
    r = run_ctl("-s", real_daemon.socket, "validate", "tiny", "--levels", "1,2", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr + real_daemon.output()[-3000:]
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()
            if line.startswith(("L1 ", "L2 "))}
    assert rows["L1"][-2:] == ["match", "OK"] and rows["L2"][-2:] == ["match", "OK"]
    assert r.stdout.splitlines()[-1] == "Result: ALL PASSED"


def test_sleep_and_wake_a_real_vllm(real_daemon: DaemonProcess) -> None:
    sock = ["-s", real_daemon.socket]
    r = run_ctl(*sock, "sleep", "tiny", "--level", "2", timeout=600)
    assert r.returncode == 0, r.stderr
    status = json.loads(run_ctl(*sock, "status", "tiny", "--json").stdout)["models"]["tiny"]
    assert (status["state"], status["sleep_level"]) == ("sleeping", 2)
    r = run_ctl(*sock, "wake", "tiny", timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tiny: woke, active")
