"""A→B→A switches at every sleep level against the simulator, through the real daemon."""

from __future__ import annotations

import pytest

from llmux_testkit.daemon import sim_model

from .daemon_helpers import gpu_used_mib, leased_chat, model_gpu_mib

RESIDUE = 2048


@pytest.mark.parametrize("level", [1, 2, 3])
def test_switch_a_b_a_frees_memory_and_answers_the_same(make_daemon, level):
    d = make_daemon({"a": sim_model(sleep_level=level), "b": sim_model(sleep_level=level)})
    first_a, _ = leased_chat(d, "a")
    a = d.status("a")
    assert a["state"] == "active"
    a_pid = a["pid"]
    held_by_a = model_gpu_mib(d, a_pid)
    assert held_by_a > RESIDUE

    first_b, _ = leased_chat(d, "b")
    a = d.status("a")
    b = d.status("b")
    assert b["state"] == "active"
    if level == 3:
        assert a["state"] == "stopped" and a["pid"] is None
    else:
        assert (a["state"], a["sleep_level"], a["pid"]) == ("sleeping", level, a_pid)
    assert model_gpu_mib(d, a_pid) <= RESIDUE
    assert gpu_used_mib(d) <= model_gpu_mib(d, b["pid"]) + RESIDUE
    switch = a["last_switch"]
    assert (switch["from"], switch["to"], switch["result"]) == ("a", "b", "ok")
    assert {"drain", "sleep", "start"} <= set(switch["phases_ms"])
    if level != 3:
        assert "verify" in switch["phases_ms"]

    again_a, _ = leased_chat(d, "a")
    assert again_a == first_a
    a = d.status("a")
    b = d.status("b")
    assert a["state"] == "active" and b["state"] in ("sleeping", "stopped")
    assert model_gpu_mib(d, b["pid"]) <= RESIDUE
    if level != 3:
        assert a["pid"] == a_pid
        assert "wake" in a["last_switch"]["phases_ms"]
    again_b, _ = leased_chat(d, "b")
    assert again_b == first_b
    assert len([e for e in d.log_events("switch") if e["result"] == "ok"]) >= 4
    assert d.stop() == 0


def test_two_models_at_0_4_are_active_together(make_daemon):
    d = make_daemon({"a": sim_model(gpu_memory_utilization=0.4),
                     "b": sim_model(gpu_memory_utilization=0.4)})
    leased_chat(d, "a")
    leased_chat(d, "b")
    assert (d.status("a")["state"], d.status("b")["state"]) == ("active", "active")
    assert not [e for e in d.log_events("transition") if e["to_state"] == "draining"]


def test_two_models_at_0_9_are_not_active_together(make_daemon):
    d = make_daemon({"a": sim_model(gpu_memory_utilization=0.9, sleep_level=1),
                     "b": sim_model(gpu_memory_utilization=0.9, sleep_level=1)})
    leased_chat(d, "a")
    leased_chat(d, "b")
    assert (d.status("a")["state"], d.status("b")["state"]) == ("sleeping", "active")


def test_model_on_another_gpu_stays_active(make_daemon):
    d = make_daemon({"a": sim_model(gpus=[0]), "b": sim_model(gpus=[1])}, gpus=2)
    leased_chat(d, "a")
    leased_chat(d, "b")
    assert (d.status("a")["state"], d.status("b")["state"]) == ("active", "active")


def test_switch_waits_for_the_in_flight_lease_to_end(make_daemon):
    import threading

    from .daemon_helpers import lease, release
    d = make_daemon({"a": sim_model(sleep_level=1), "b": sim_model(sleep_level=1)},
                    config={"daemon": {"drain_timeout_secs": 120}})
    code, held = lease(d, "a")
    assert code == 200
    got: list = []
    t = threading.Thread(target=lambda: got.append(lease(d, "b")))
    t.start()
    d.wait_state("a", "draining")
    assert d.status("b")["queued"] == 1 and d.status("a")["in_flight"] == 1
    release(d, held["lease_id"])
    t.join(60)
    assert got[0][0] == 200, got
    release(d, got[0][1]["lease_id"])
    assert d.status("a")["state"] == "sleeping"
    switch = d.status("b")["last_switch"]
    assert switch["from"] == "a" and switch["phases_ms"]["drain"] > 0


def test_drain_is_bounded_by_the_drain_timeout(make_daemon):
    from .daemon_helpers import lease
    d = make_daemon({"a": sim_model(sleep_level=1), "b": sim_model(sleep_level=1)},
                    config={"daemon": {"drain_timeout_secs": 1.0}})
    code, _held = lease(d, "a")                 # never released
    assert code == 200
    code, grant = lease(d, "b")
    assert code == 200, grant
    assert d.status("a")["state"] == "sleeping"
    assert d.log_events("drain_timeout")[0]["in_flight"] == 1


def test_min_active_secs_keeps_the_active_model_before_switching(make_daemon):
    d = make_daemon({"a": sim_model(sleep_level=1), "b": sim_model(sleep_level=1)},
                    config={"policy": {"min_active_secs": 2.0}})
    leased_chat(d, "a")
    leased_chat(d, "b")
    events = d.log_events("transition")
    active = next(e for e in events if e["model"] == "a" and e["to_state"] == "active")
    draining = next(e for e in events if e["model"] == "a" and e["to_state"] == "draining")
    from datetime import datetime
    held = (datetime.fromisoformat(draining["timestamp"].replace("Z", "+00:00"))
            - datetime.fromisoformat(active["timestamp"].replace("Z", "+00:00")))
    assert held.total_seconds() >= 2.0


def test_without_drain_before_switch_leases_in_flight_are_drained_not_slept_under(make_daemon):
    # issue 10: sleeping under granted leases (the seed's drain=false) was a livelock
    # with min_active_secs = 0; fifo now drains whatever is in flight anyway
    import time
    from concurrent.futures import ThreadPoolExecutor

    from .daemon_helpers import lease, release
    d = make_daemon({"a": sim_model(sleep_level=1), "b": sim_model(sleep_level=1)},
                    config={"policy": {"drain_before_switch": False},
                            "daemon": {"drain_timeout_secs": 120}})
    code, held = lease(d, "a")
    assert code == 200
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lease, d, "b")
        deadline = time.monotonic() + 30
        while d.status("a")["state"] != "draining":
            assert time.monotonic() < deadline, d.status("a")
            time.sleep(0.05)
        assert not waiting.done()
        release(d, held["lease_id"])
        code, grant = waiting.result(timeout=60)
    assert code == 200, grant
    assert d.status("a")["state"] == "sleeping"
    assert not d.log_events("no_drain")
    release(d, grant["lease_id"])


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(make_daemon):
    d = make_daemon({"a": sim_model(sleep_level=3, extra_args=["--sim-fault", "ignore_sigterm"]),
                     "b": sim_model(sleep_level=3)},
                    config={"daemon": {"stop_timeout_secs": 1.0}})
    leased_chat(d, "a")
    a_pid = d.status("a")["pid"]
    leased_chat(d, "b")
    assert d.status("a")["state"] == "stopped"
    assert model_gpu_mib(d, a_pid) == 0
    leased_chat(d, "a")
    assert d.stop() == 0


def test_a_switch_line_names_the_preflight_and_the_host_memory_measurement(make_daemon):
    """Bench P4 (issue 11c): ~20 ms of a warm L1 switch were in no phase of its record
    (the wake's GPU preflight and the L1 host-memory measurement around the sleep), so
    the switch line could not say where the time went. Both are phases now."""
    d = make_daemon({"a": sim_model(sleep_level=1), "b": sim_model(sleep_level=1)})
    leased_chat(d, "a")
    leased_chat(d, "b")
    leased_chat(d, "a")         # a warm switch: b sleeps at L1, a wakes from L1
    switch = d.status("a")["last_switch"]
    assert (switch["from"], switch["to"], switch["result"]) == ("b", "a", "ok")
    assert {"sleep", "verify", "hostmem", "preflight", "wake"} <= set(switch["phases_ms"])
    logged = [e for e in d.log_events("switch") if e["to_model"] == "a"][-1]
    assert "preflight_ms" in logged and "hostmem_ms" in logged
    assert d.stop() == 0
