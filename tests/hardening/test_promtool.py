"""``promtool check metrics`` finds nothing to say about llmuxd's or the simulator's /metrics.

promtool comes with Debian's ``prometheus`` package (.ci/run installs it). In CI
(CI=true) a missing promtool is a failure, not a skip: this check must run there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from llmux_testkit.daemon import free_port, sim_model
from llmux_testkit.sim import SimProcess, init_gpus


def promtool() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail("promtool is missing: apt-get install -y --no-install-recommends "
                    "prometheus (see .ci/run)")
    pytest.skip("promtool not installed (apt-get install prometheus); required in CI")


COLON = "metric names should not contain ':'"


def check(text: str, vllm_names: bool = False) -> None:
    """promtool has nothing to say; ``vllm_names``: except that ``vllm:`` names have a colon.

    vLLM's own names are ``vllm:...`` (the recording-rule convention, which promtool's
    linter flags); the simulator must use the same names, so that one lint, on those
    names only, is expected. Any other lint, or a parse error (exit 1), fails.
    """
    r = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    if vllm_names:
        problems = [p for p in problems if not (p.startswith("vllm:") and p.endswith(COLON))]
        assert r.returncode in (0, 3), (r.returncode, problems, text[:3000])
    else:
        assert r.returncode == 0, (problems, text[:3000])
    assert problems == [], text[:3000]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def test_llmuxd_metrics_pass_promtool(make_daemon):
    promtool()
    port = free_port()
    d = make_daemon({"a": sim_model(), "b": sim_model()}, config={"metrics_port": port})
    assert d.request("POST", "/v1/models/a/start")[0] == 200
    assert d.request("POST", "/v1/models/b/switch")[0] == 200   # switch and phase series
    text = _get(f"http://127.0.0.1:{port}/metrics")
    assert "llmux_switch_total" in text and "llmux_model_state" in text
    check(text)


def test_simulator_metrics_pass_promtool(tmp_path: Path):
    promtool()
    gpus = init_gpus(tmp_path / "gpus")
    with SimProcess("sim/m", served_model_name='we"ird\\model', gpu_state=gpus) as s:
        s.post("/v1/completions", json={"model": 'we"ird\\model', "prompt": "hi",
                                        "max_tokens": 2})
        s.post("/sleep?level=1")
        s.post("/wake_up")
        text = s.get("/metrics").text
    assert "vllm:sleep_mode_operation_duration_seconds_sum" in text
    check(text, vllm_names=True)
