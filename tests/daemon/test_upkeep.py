"""Prewarm, idle TTL and keep-active through the real daemon with simulated children."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

from llmux_testkit.daemon import free_port, sim_model

from .daemon_helpers import lease, leased_chat, release


def _events(d, event, **match):
    return [e for e in d.log_events(event) if all(e.get(k) == v for k, v in match.items())]


def _prewarm_done(d, name, note):
    """The model's status once its prewarm line reads ``note``: the line changes a loop
    pass after the state does, so waiting on the state alone races it."""
    return d.wait_for(lambda: (lambda s: s if s["prewarm"] == note else None)(d.status(name)),
                      30, f"{name}'s prewarm: {note}")


def _metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_prewarm_starts_models_at_boot_asleep_and_first_lease_wakes(make_daemon):
    port = free_port()
    d = make_daemon({"a": sim_model(sleep_level=1, prewarm=True),
                     "b": sim_model(sleep_level=2, prewarm=True),
                     "c": sim_model(sleep_level=1)}, config={"metrics_port": port})
    d.wait_state("a", "sleeping")
    d.wait_state("b", "sleeping")
    # The progress line says "done" once the prewarm's sleep operation has ended,
    # a loop pass after the state changed.
    _prewarm_done(d, "b", "done: asleep at level 2")
    a, b = d.status("a"), d.status("b")
    assert (a["sleep_level"], b["sleep_level"]) == (1, 2)
    assert a["pid"] is not None and b["pid"] is not None
    assert d.status("c")["state"] == "stopped"
    assert a["prewarm"] == "done: asleep at level 1"
    assert b["prewarm"] == "done: asleep at level 2"
    up = d.status()["upkeep"]["prewarm"]
    assert up["current"] is None and up["pending"] == []
    out = subprocess.run([sys.executable, "-m", "llmuxctl", "-s", d.socket, "status"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "prewarm: a done: asleep at level 1; b done: asleep at level 2" in out
    assert "host RAM: models hold" in out
    page = _metrics(port)
    assert 'llmux_prewarm_total{model="a",result="asleep"} 1.0' in page
    assert 'llmux_prewarm_total{model="b",result="asleep"} 1.0' in page
    d.wait_for(lambda: "llmux_prewarm_pending 0.0" in _metrics(port), 10, "pending 0")

    # One at a time, in config order: b started only after a was asleep.
    steps = [(e["model"], e["step"]) for e in d.log_events("prewarm")]
    assert steps.index(("a", "done: asleep at level 1")) < steps.index(("b", "starting"))
    starts = [e["model"] for e in _events(d, "transition", to_state="starting")]
    assert starts == ["a", "b"]

    pid = a["pid"]
    leased_chat(d, "a")
    a = d.status("a")
    assert a["state"] == "active" and a["pid"] == pid
    phases = a["last_switch"]["phases_ms"]
    assert "wake" in phases and "start" not in phases
    assert a["last_switch"]["to"] == "a"
    assert d.stop() == 0


def test_prewarm_gives_way_to_a_request(make_daemon):
    """A request for the model being prewarmed wins: it is served and left active."""
    d = make_daemon({"a": sim_model(sleep_level=1, prewarm=True)},
                    env={"LLMUX_SIM_LOAD_S": "100"})       # 1 s of start at time scale 0.01
    d.wait_state("a", "starting")
    leased_chat(d, "a")
    d.wait_for(lambda: (d.status("a")["prewarm"] or "").startswith("done"), 30, "prewarm end")
    a = d.status("a")
    assert a["state"] == "active"
    assert a["prewarm"] == "done: in use: left active"


def test_idle_sleep_secs_puts_an_idle_model_to_sleep_at_its_level(make_daemon):
    ttl = 1.0
    port = free_port()
    d = make_daemon({"a": sim_model(sleep_level=1, idle_sleep_secs=ttl),
                     "b": sim_model(sleep_level=1)}, config={"metrics_port": port})
    code, grant = lease(d, "a")
    assert code == 200, grant
    # A lease in flight keeps it active however long it takes.
    deadline = time.monotonic() + 3 * ttl
    while time.monotonic() < deadline:
        s = d.status("a")
        assert s["state"] == "active" and s["scheduling"]["idle_s"] is None, s
        time.sleep(0.1)
    release(d, grant["lease_id"])
    a = d.wait_state("a", "sleeping", timeout=30)
    assert a["sleep_level"] == 1
    sw = a["last_switch"]
    assert (sw["from"], sw["to"], sw["result"]) == ("a", None, "ok")
    idle = _events(d, "idle_sleep", model="a")
    assert len(idle) == 1 and idle[0]["idle_s"] >= ttl
    assert 'llmux_idle_sleeps_total{model="a"} 1.0' in _metrics(port)
    # b has no TTL: it stays active when idle.
    leased_chat(d, "b")
    assert d.status("a")["state"] == "sleeping"
    deadline = time.monotonic() + 3 * ttl
    while time.monotonic() < deadline:
        assert d.status("b")["state"] == "active"
        time.sleep(0.1)
    assert d.status("b")["scheduling"]["idle_s"] >= ttl


def test_idle_sleep_at_level_3_stops_the_model(make_daemon):
    d = make_daemon({"a": sim_model(sleep_level=3, idle_sleep_secs=0.5)})
    leased_chat(d, "a")
    a = d.wait_state("a", "stopped", timeout=30)
    assert a["pid"] is None


def test_keep_active_model_runs_from_boot_and_is_never_evicted(make_daemon):
    port = free_port()
    d = make_daemon({"k": sim_model(keep_active=True, gpu_memory_utilization=0.4),
                     "a": sim_model(sleep_level=1, gpu_memory_utilization=0.5),
                     "b": sim_model(sleep_level=1, gpu_memory_utilization=0.5)},
                    config={"metrics_port": port})
    k = d.wait_state("k", "active")          # no request asked for it
    assert k["keep_active"] is True
    leased_chat(d, "a")
    leased_chat(d, "b")                      # a (not k) makes room
    assert d.status("a")["state"] == "sleeping"
    assert d.status("k")["state"] == "active"
    leased_chat(d, "k")

    code, body = d.request("POST", "/v1/models/k/sleep", {"level": 1})
    assert code == 409, body
    assert body["error"]["code"] == "conflict" and "keep_active" in body["error"]["message"]

    old_pid = d.status("k")["pid"]
    code, body = d.request("POST", "/v1/models/k/kill", {})
    assert code == 200, body
    k = d.wait_for(lambda: (lambda s: s if s["state"] == "active" and s["pid"] != old_pid
                            else None)(d.status("k")), 60, "k back after a kill")
    assert len(_events(d, "keep_active", model="k")) == 2     # boot, after the kill
    assert 'llmux_keep_active_restarts_total{model="k"} 1.0' in _metrics(port)
    assert d.status("b")["state"] == "active"


def test_prewarm_never_makes_room_it_skips_a_model_the_residue_leaves_no_room_for(make_daemon):
    """10000 MiB GPU, 0.8 each: after a and b sleep (2 x 1341 MiB of residue) c does not
    fit; its prewarm is skipped, a and b keep their fast wake."""
    d = make_daemon({n: sim_model(sleep_level=1, gpu_memory_utilization=0.8, prewarm=True)
                     for n in ("a", "b", "c")}, gpu_mib=10000)
    c = d.wait_for(lambda: (lambda s: s if (s["prewarm"] or "").startswith("skipped")
                            else None)(d.status("c")), 60, "c's prewarm skipped")
    assert "not enough free GPU memory" in c["prewarm"]
    assert c["state"] == "stopped" and c["failures"] == 0
    assert (d.status("a")["state"], d.status("b")["state"]) == ("sleeping", "sleeping")
    assert not [e for e in d.log_events("making_room")]
    # A request for c then makes room the usual way (the LRU sleeper goes).
    leased_chat(d, "c")
    assert d.status("c")["state"] == "active"


def test_reload_adding_a_prewarm_model_prewarms_it(make_daemon):
    d = make_daemon({"a": sim_model(sleep_level=1)})
    d.models["b"] = sim_model(sleep_level=2, prewarm=True)
    d.write_config()
    code, body = d.request("POST", "/v1/reload", {})
    assert code == 200 and body["added"] == ["b"], body
    b = _prewarm_done(d, "b", "done: asleep at level 2")
    assert b["sleep_level"] == 2 and b["state"] == "sleeping"
    assert d.status("a")["state"] == "stopped"


def test_a_prewarm_waiting_for_room_does_not_hold_up_the_next_one(make_daemon):
    d = make_daemon({"x": sim_model(sleep_level=1, gpus=[0])}, gpus=2)
    leased_chat(d, "x")                                  # x holds GPU 0
    d.models["a"] = sim_model(sleep_level=1, gpus=[0], prewarm=True)
    d.models["b"] = sim_model(sleep_level=1, gpus=[1], prewarm=True)
    d.write_config()
    code, body = d.request("POST", "/v1/reload", {})
    assert code == 200, body
    b = _prewarm_done(d, "b", "done: asleep at level 1")
    assert b["state"] == "sleeping"
    a = d.status("a")
    assert a["state"] == "stopped" and a["prewarm"] == "waiting for room: x on its GPUs"
    assert d.status()["upkeep"]["prewarm"]["pending"] == ["a"]
    # Once x leaves GPU 0, a is prewarmed too.
    code, body = d.request("POST", "/v1/models/x/sleep", {"level": 1})
    assert code == 200, body
    a = _prewarm_done(d, "a", "done: asleep at level 1")
    assert a["state"] == "sleeping"


def test_reload_changing_only_upkeep_keys_keeps_the_child(make_daemon):
    """prewarm, idle_sleep_secs and keep_active say when llmuxd moves a model, not how
    its vLLM runs: changing them by reload must not restart it."""
    d = make_daemon({"a": sim_model(sleep_level=1)})
    leased_chat(d, "a")
    pid = d.status("a")["pid"]
    d.models["a"] = {**d.models["a"], "idle_sleep_secs": 0.5}
    d.write_config()
    code, body = d.request("POST", "/v1/reload", {})
    assert code == 200 and body["changed"] == ["a"], body
    a = d.wait_state("a", "sleeping", timeout=30)        # the new TTL applies...
    assert a["pid"] == pid and a["idle_sleep_secs"] == 0.5  # ...to the same child
    assert not [e for e in d.log_events("transition")
                if e["model"] == "a" and e["to_state"] == "stopping"]
