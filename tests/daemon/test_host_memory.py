"""Memory-aware sleeping through the real daemon: a small host-RAM budget, simulated children.

The simulator's engine really allocates its L1 host copy (size x
LLMUX_SIM_HOST_RAM_FACTOR: 2 GiB x 1/16 = 128 MiB here), and llmuxd reads it the way it
reads a real child: the RSS of the child's process tree. The budget is set by a
reload once the models' sizes were measured (the box's RSS of a Python child is not
known in advance), a little above what they hold then.
"""

from __future__ import annotations

import time
import urllib.request

from llmux_testkit.daemon import free_port, sim_model

from .daemon_helpers import leased_chat

MIB = 1 << 20
L1_BYTES = 128 * MIB
ENV = {"LLMUX_SIM_SIZE_GIB": "2", "LLMUX_SIM_HOST_RAM_FACTOR": "0.0625"}


def _learned(d, names):
    """Wait until every model in ``names`` has a measured L1 size and a fresh RSS sample."""
    def ready():
        st = d.status()["models"]
        return all(st[n]["l1_host_bytes"] is not None and st[n]["host_memory_bytes"]
                   for n in names)
    d.wait_for(ready, 30, "L1 sizes measured")
    for n in names:
        assert d.status(n)["l1_host_bytes"] >= L1_BYTES * 0.9, d.status(n)


def _set_limit_above_what_is_held(d, margin):
    # A sample begun now, after the test's last switch: one taken before a model woke
    # still counts its level-1 copy (CI saw that: a budget 128 MiB too generous).
    since = time.time()

    def sampled_since():
        status = d.status()
        fresh = (status["memory"]["sampled_at"] or 0) >= since
        return fresh and all(m["host_memory_bytes"] for m in status["models"].values()
                             if m["pid"] is not None)
    d.wait_for(sampled_since, 30, "host RAM sampled after the last switch")
    held = d.status()["memory"]["models_bytes"]
    d.extra.setdefault("daemon", {})["host_memory_limit"] = str(held + margin)
    d.write_config()
    code, body = d.request("POST", "/v1/reload", {})
    assert code == 200, body
    assert d.status()["memory"]["limit"] == str(held + margin)
    return held


def test_l1_sleep_over_the_host_budget_is_demoted_to_level_2(make_daemon):
    metrics_port = free_port()
    d = make_daemon({"a": sim_model(sleep_level=1), "b": sim_model(sleep_level=1)}, env=ENV,
                    config={"metrics_port": metrics_port})
    for name in ("a", "b", "a"):
        leased_chat(d, name)
    _learned(d, ["a", "b"])
    assert d.status("b")["sleep_level"] == 1
    _set_limit_above_what_is_held(d, L1_BYTES // 2)

    leased_chat(d, "b")            # a must leave: its 128 MiB L1 copy does not fit
    a = d.status("a")
    assert (a["state"], a["sleep_level"]) == ("sleeping", 2)
    assert a["configured_sleep_level"] == 1
    mem = d.status()["memory"]
    action = mem["recent_actions"][-1]
    assert (action["action"], action["model"]) == ("demote_l2", "a")
    assert "level 2" in action["why"] and "measured" in action["why"]
    logged = [e for e in d.log_events("host_memory") if e["action"] == "demote_l2"]
    assert [e["model"] for e in logged] == ["a"]
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        page = r.read().decode()
    assert 'llmux_memory_actions_total{action="demote_l2",model="a"} 1.0' in page
    assert "llmux_host_memory_limit_bytes" in page and "llmux_model_host_memory_bytes" in page
    # The next wake of a reloads its weights (level 2), and it answers the same.
    leased_chat(d, "a")
    assert d.status("a")["state"] == "active"


def test_l1_sleep_stops_the_least_recently_used_l1_sleeper_first(make_daemon):
    d = make_daemon({"a": sim_model(sleep_level=1), "b": sim_model(sleep_level=1),
                     "c": sim_model(sleep_level=1)}, env=ENV)
    for name in ("a", "b", "c", "a"):
        leased_chat(d, name)      # last used: b, then c, then a
    _learned(d, ["a", "b", "c"])
    _set_limit_above_what_is_held(d, L1_BYTES // 2)

    # b is wanted (never stopped for this); c was used before a: c goes, a keeps L1.
    leased_chat(d, "b")
    d.wait_state("c", "stopped")
    a = d.status("a")
    assert (a["state"], a["sleep_level"]) == ("sleeping", 1)
    actions = [(x["action"], x["model"]) for x in d.status()["memory"]["recent_actions"]]
    assert actions == [("stop_sleeper", "c")]
    stopping = [e for e in d.log_events("transition")
                if e["model"] == "c" and e["to_state"] == "stopping"]
    assert len(stopping) == 1 and "host RAM" in stopping[0]["reason"]


def test_gpu_residue_in_the_way_stops_only_the_least_recently_used_sleeper(make_daemon):
    """10000 MiB GPU, 0.8 each: two sleepers' residue (2 x 1341) leave 7318 MiB, c needs
    8000; stopping one sleeper (the LRU one, a) is enough, b keeps its fast wake."""
    d = make_daemon({n: sim_model(sleep_level=1, gpu_memory_utilization=0.8)
                     for n in ("a", "b", "c")}, gpu_mib=10000)
    leased_chat(d, "a")
    leased_chat(d, "b")
    leased_chat(d, "c")
    st = d.status()["models"]
    assert (st["a"]["state"], st["b"]["state"], st["c"]["state"]) == (
        "stopped", "sleeping", "active")
    d.wait_for(lambda: d.status()["memory"]["sleepers_gpu_mib"].get("0", 0) > 0, 30,
               "b's residue shown")
    rooms = [e for e in d.log_events("making_room") if e.get("stop")]
    assert [e["stop"] for e in rooms] == ["a"]
    assert rooms[0]["reason"] == "least recently used sleeper"
