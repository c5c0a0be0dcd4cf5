"""The pure rules of upkeep (idle TTL, prewarm steps) and memory-aware sleeping, edge by edge."""

from __future__ import annotations

import pytest

from llmuxd.config import parse_memory_limit
from llmuxd.host_memory import (
    SleeperFacts,
    lru_key,
    over_budget,
    plan_l1_sleep,
    resolve_limit,
)
from llmuxd.hostmem import HostMemory, read_meminfo, tree_rss, trees_rss
from llmuxd.states import ModelState
from llmuxd.upkeep import IdleFacts, PrewarmFacts, Stage, idle_expired, prewarm_step

S = ModelState
GIB = 1 << 30


def idle(name="a", state=S.ACTIVE, since=0.0, ttl=10.0, **kw):
    base = dict(name=name, state=state, busy=False, idle_since=since, idle_sleep_secs=ttl,
                keep_active=False, pinned=False)
    base.update(kw)
    return IdleFacts(**base)


def test_idle_expired_only_active_idle_models_past_their_ttl():
    assert idle_expired([idle()], now=10.0) == ["a"]
    assert idle_expired([idle()], now=9.99) == []
    assert idle_expired([idle(ttl=0.0)], now=1e9) == []           # 0 = never
    assert idle_expired([idle(since=None)], now=1e9) == []        # in use
    assert idle_expired([idle(state=S.DRAINING)], now=1e9) == []
    assert idle_expired([idle(busy=True)], now=1e9) == []
    assert idle_expired([idle(keep_active=True)], now=1e9) == []
    assert idle_expired([idle(pinned=True)], now=1e9) == []


def pw(state=S.STOPPED, **kw):
    base = dict(state=state, busy=False, traffic=False, anyone_waiting=False,
                others_moving=False, fits=True, blocking=())
    base.update(kw)
    return PrewarmFacts(**base)


def test_prewarm_steps():
    assert prewarm_step(Stage.PENDING, pw()) == ("start", "starting")
    assert prewarm_step(Stage.PENDING, pw(anyone_waiting=True))[0] == "wait"
    assert prewarm_step(Stage.PENDING, pw(others_moving=True))[0] == "wait"
    action, note = prewarm_step(Stage.PENDING, pw(fits=False, blocking=("x",)))
    assert action == "wait" and "x" in note
    assert prewarm_step(Stage.PENDING, pw(state=S.ACTIVE))[0] == "done"
    assert prewarm_step(Stage.STARTING, pw(state=S.STARTING))[0] == "wait"
    assert prewarm_step(Stage.STARTING, pw(state=S.ACTIVE)) == ("sleep", "going to sleep")
    assert prewarm_step(Stage.STARTING, pw(state=S.ACTIVE, traffic=True))[0] == "done"
    assert prewarm_step(Stage.STARTING, pw(state=S.BACKOFF))[0] == "skip"
    assert prewarm_step(Stage.STARTING, pw(state=S.STOPPED))[0] == "skip"
    assert prewarm_step(Stage.SLEEPING, pw(state=S.DRAINING))[0] == "wait"
    assert prewarm_step(Stage.SLEEPING, pw(state=S.SLEEPING)) == ("done", "asleep")
    assert prewarm_step(Stage.SLEEPING, pw(state=S.STOPPED))[0] == "done"


@pytest.mark.parametrize(("spec", "want"), [
    ("auto", ("auto", 0.0)), ("1024", ("bytes", 1024.0)), ("64GiB", ("bytes", 64.0 * GIB)),
    ("64 gib", ("bytes", 64.0 * GIB)), ("500MB", ("bytes", 500e6)),
    ("1.5TiB", ("bytes", 1.5 * (1 << 40))), ("80%", ("percent", 80.0)),
])
def test_parse_memory_limit(spec, want):
    assert parse_memory_limit(spec) == want


@pytest.mark.parametrize("spec", ["", "lots", "0", "-5GiB", "64 parsecs", "0%", "101%", "%"])
def test_parse_memory_limit_refuses(spec):
    with pytest.raises(ValueError):
        parse_memory_limit(spec)


def test_resolve_limit_auto_leaves_ten_percent_free_and_explicit_only_tightens():
    host = HostMemory(total=100 * GIB, available=40 * GIB)
    assert resolve_limit("auto", 20 * GIB, host)[0] == 50 * GIB     # 20 + 40 - 10
    assert resolve_limit("30GiB", 20 * GIB, host)[0] == 30 * GIB
    limit, how = resolve_limit("90GiB", 20 * GIB, host)
    assert limit == 50 * GIB and "capped" in how
    assert resolve_limit("25%", 20 * GIB, host)[0] == 25 * GIB


def sleeper(name, used, level=1, size=GIB, wanted=False):
    return SleeperFacts(name, level, size, used, 0.0, wanted)


def test_l1_sleep_that_fits_is_left_alone():
    plan = plan_l1_sleep("a", GIB, 10.0, 0.0, held=2 * GIB, limit=3 * GIB, sleepers=[])
    assert (plan.level, plan.stop, plan.why) == (1, (), "")


def test_l1_sleep_stops_older_l1_sleepers_lru_first():
    sleepers = [sleeper("new", 9.0), sleeper("old", 1.0), sleeper("never", None),
                sleeper("l2", 0.5, level=2), sleeper("wanted", 0.1, wanted=True)]
    plan = plan_l1_sleep("a", GIB, 10.0, 0.0, held=4 * GIB, limit=3 * GIB, sleepers=sleepers)
    assert plan.level == 1 and plan.stop == ("never", "old")
    assert "least recently used" in plan.why


def test_l1_sleep_is_demoted_when_no_older_sleeper_frees_enough():
    # Only newer sleepers: keep them, demote the model going to sleep.
    plan = plan_l1_sleep("a", GIB, 5.0, 0.0, held=4 * GIB, limit=3 * GIB,
                         sleepers=[sleeper("newer", 9.0)])
    assert (plan.level, plan.stop) == (2, ())
    assert "level 2" in plan.why
    # Older ones that together free too little: none is stopped for nothing.
    plan = plan_l1_sleep("a", 4 * GIB, 5.0, 0.0, held=4 * GIB, limit=3 * GIB,
                         sleepers=[sleeper("old", 1.0)])
    assert (plan.level, plan.stop) == (2, ())
    # A never-used model (a prewarm) does not push out anyone.
    plan = plan_l1_sleep("a", GIB, None, 0.0, held=4 * GIB, limit=3 * GIB,
                         sleepers=[sleeper("never", None)])
    assert plan.level == 2


def test_over_budget_stops_lru_l1_sleepers_until_under():
    sleepers = [sleeper("b", 2.0), sleeper("c", 1.0), sleeper("d", 3.0)]
    assert over_budget(5 * GIB, 4 * GIB, sleepers) == ["c"]
    assert over_budget(6 * GIB, 4 * GIB, sleepers) == ["c", "b"]
    assert over_budget(3 * GIB, 4 * GIB, sleepers) == []


def test_lru_key_orders_never_used_first():
    keys = sorted([(lru_key(5.0, 0.0), "recent"), (lru_key(None, 9.0), "never"),
                   (lru_key(1.0, 0.0), "old")])
    assert [k[1] for k in keys] == ["never", "old", "recent"]


def test_read_meminfo(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       24684096 kB\nMemFree:  1 kB\nMemAvailable:   23522312 kB\n")
    host = read_meminfo(str(f))
    assert (host.total, host.available) == (24684096 * 1024, 23522312 * 1024)
    real = read_meminfo()
    assert 0 < real.available <= real.total


def test_trees_rss_sums_a_process_tree_like_tree_rss():
    import os
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        me = os.getpid()
        both = trees_rss([me, child.pid, 2**22 + 12345])
        assert both[2**22 + 12345] is None
        assert both[child.pid] and both[me] >= both[child.pid] + 1
        single = tree_rss(child.pid)
        assert single is not None and abs(single - both[child.pid]) < 16 << 20
    finally:
        child.stdin.close()
        child.wait(10)


def test_weights_on_disk_local_dir_and_hf_cache(tmp_path):
    from llmuxd.config import ModelConfig
    from llmuxd.host_memory import weights_on_disk

    local = tmp_path / "model"
    (local / "sub").mkdir(parents=True)
    (local / "a.safetensors").write_bytes(b"x" * 1000)
    (local / "sub" / "b.safetensors").write_bytes(b"x" * 500)
    (local / "config.json").write_bytes(b"{}" * 100)
    assert weights_on_disk(ModelConfig("m", str(local), 8001)) == 1500

    hub = tmp_path / "hf" / "hub" / "models--org--name" / "snapshots" / "abc"
    hub.mkdir(parents=True)
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 700)
    (hub / "model.safetensors").symlink_to(blob)        # the cache's layout
    mc = ModelConfig("m", "org/name", 8001, env={"HF_HOME": str(tmp_path / "hf")})
    assert weights_on_disk(mc) == 700
    assert weights_on_disk(ModelConfig("m", "org/other", 8001,
                                       env={"HF_HOME": str(tmp_path / "hf")})) is None


class _FakeOps:
    def __init__(self):
        self.stopped = []

    def stop_model(self, m, reason, kill=False):
        self.stopped.append(m.name)


class _FakeChild:
    pid = 1


def _keeper(limit, states):
    """A HostMemoryKeeper over a real Core whose models are put in ``states`` by hand."""
    from llmuxd.config import build_config
    from llmuxd.core import Core, Mailbox
    from llmuxd.host_memory import HostMemoryKeeper

    config = build_config({"models": {n: {"model_path": "x/y", "port": 8001 + i,
                                          "sleep_level": 1}
                                      for i, n in enumerate(states)},
                           "daemon": {"host_memory_limit": str(limit)}})
    core = Core(config, "", Mailbox())
    for n, (state, level, rss, used) in states.items():
        m = core.models[n]
        m.state, m.sleep_level, m.host_memory_bytes, m.last_used = state, level, rss, used
        m.child = _FakeChild() if state is not S.STOPPED else None
    ops = _FakeOps()
    keeper = HostMemoryKeeper(core, ops, read_host=lambda: HostMemory(64 * GIB, 60 * GIB))
    return core, ops, keeper


def test_a_model_being_stopped_does_not_count_against_the_budget():
    """c is being stopped to make room for a's L1 sleep; when a's sleep is done, c's
    memory (still sampled) must not make the keeper stop a too."""
    mib = 1 << 20
    core, ops, keeper = _keeper(600 * mib, {
        "a": (S.SLEEPING, 1, 300 * mib, 3.0),
        "b": (S.WAKING, 1, 200 * mib, 2.0),
        "c": (S.STOPPING, 1, 170 * mib, 1.0),
    })
    keeper.slept(core.models["a"], 1, 170 * mib, 300 * mib)
    assert ops.stopped == []
    assert core.models["a"].l1_host == ("x/y", 130 * mib)


def test_choose_level_stops_the_lru_sleeper_or_demotes():
    mib = 1 << 20
    core, ops, keeper = _keeper(600 * mib, {
        "a": (S.DRAINING, 1, 170 * mib, 5.0),
        "b": (S.SLEEPING, 1, 300 * mib, 1.0),
    })
    a = core.models["a"]
    a.l1_host = ("x/y", 200 * mib)
    assert keeper.choose_level(a, 1) == 1 and ops.stopped == ["b"]
    assert [x["action"] for x in keeper.actions] == ["stop_sleeper"]
    core.models["b"].last_used = 9.0          # b is the more recent one: a is demoted
    ops.stopped.clear()
    assert keeper.choose_level(a, 1) == 2 and ops.stopped == []
    assert keeper.actions[-1]["action"] == "demote_l2"
    assert keeper.choose_level(a, 2) == 2     # only level-1 sleeps are budgeted
