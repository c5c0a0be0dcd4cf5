"""The fifo policy, edge by edge, on hand-built snapshots (no processes)."""

from __future__ import annotations

from typing import Any

from llmuxd.policy.base import Activate, Deactivate, ModelView, PolicyInput
from llmuxd.policy.fifo import FifoPolicy
from llmuxd.states import ModelState as S


def view(name: str, state: S = S.STOPPED, **kw: Any) -> ModelView:
    base: dict[str, Any] = dict(name=name, state=state, busy=False, in_flight=0, queued=0,
                                oldest_wait=None, active_since=None, gpus=(0,),
                                fraction=0.9, sleep_level=1)
    if state is S.ACTIVE:
        base["active_since"] = 0.0
    base.update(kw)
    return ModelView(**base)


def decide(*views: ModelView, now: float = 100.0, drain: bool = True,
           min_active: float = 0.0) -> Any:
    inp = PolicyInput(models={v.name: v for v in views}, now=now, drain_before_switch=drain,
                      min_active_secs=min_active)
    return FifoPolicy().decide(inp)


def test_nothing_to_do_without_waiters():
    d = decide(view("a", S.ACTIVE), view("b"))
    assert d.actions == []


def test_activate_stopped_model_with_a_waiter_when_gpu_free():
    d = decide(view("a", queued=1, oldest_wait=1.0))
    assert d.actions == [Activate("a", "requests waiting")]


def test_waiter_for_sleeping_model_deactivates_the_active_one_first():
    d = decide(view("a", S.ACTIVE), view("b", S.SLEEPING, queued=1, oldest_wait=1.0))
    assert d.actions == [Deactivate("a", 1, True, "making room for b", for_model="b")]


def test_deactivate_uses_the_victims_own_level_and_drain_setting():
    d = decide(view("a", S.ACTIVE, sleep_level=2), view("b", queued=1, oldest_wait=1.0),
               drain=False)
    assert d.actions == [Deactivate("a", 2, False, "making room for b", for_model="b")]


def test_target_waits_while_the_victim_drains():
    d = decide(view("a", S.DRAINING), view("b", S.SLEEPING, queued=1, oldest_wait=1.0))
    assert d.actions == []


def test_min_active_secs_defers_eviction_and_asks_for_a_recheck():
    d = decide(view("a", S.ACTIVE, active_since=95.0),
               view("b", queued=1, oldest_wait=1.0), now=100.0, min_active=10.0)
    assert d.actions == []
    assert d.recheck_at == 105.0


def test_fractions_that_fit_activate_without_eviction():
    d = decide(view("a", S.ACTIVE, fraction=0.4), view("b", queued=1, oldest_wait=1.0,
                                                          fraction=0.4))
    assert d.actions == [Activate("b", "requests waiting")]


def test_oldest_waiter_goes_first_and_reserves_the_gpu():
    d = decide(view("a", queued=1, oldest_wait=5.0), view("b", queued=1, oldest_wait=2.0))
    assert d.actions == [Activate("b", "requests waiting")]


def test_later_target_on_other_gpus_is_not_held_back():
    d = decide(view("a", queued=1, oldest_wait=5.0, gpus=(1,)),
               view("b", queued=1, oldest_wait=2.0))
    assert Activate("a", "requests waiting") in d.actions
    assert Activate("b", "requests waiting") in d.actions


def test_pinned_model_is_never_evicted():
    d = decide(view("a", S.ACTIVE, pinned=True), view("b", queued=1, oldest_wait=1.0))
    assert d.actions == []


def test_busy_model_is_not_a_target():
    d = decide(view("a", S.SLEEPING, busy=True, queued=1, oldest_wait=1.0))
    assert d.actions == []


def test_backoff_model_waits_until_ready_then_activates():
    early = decide(view("a", S.BACKOFF, queued=1, oldest_wait=1.0, ready_at=150.0), now=100)
    assert early.actions == [] and early.recheck_at == 150.0
    late = decide(view("a", S.BACKOFF, queued=1, oldest_wait=1.0, ready_at=150.0), now=151)
    assert late.actions == [Activate("a", "requests waiting")]


def test_failed_model_is_not_activated_by_the_policy():
    d = decide(view("a", S.FAILED, queued=1, oldest_wait=1.0))
    assert d.actions == []


def test_two_waiting_targets_evict_the_active_model_only_once():
    d = decide(view("a", S.ACTIVE), view("b", queued=1, oldest_wait=1.0),
               view("c", queued=1, oldest_wait=2.0))
    assert [x for x in d.actions if isinstance(x, Deactivate)] == [
        Deactivate("a", 1, True, "making room for b", for_model="b")]
    assert not [x for x in d.actions if isinstance(x, Activate)]


def test_idle_active_model_is_evicted_before_a_busy_one():
    d = decide(view("a", S.ACTIVE, fraction=0.5, in_flight=3),
               view("b", S.ACTIVE, fraction=0.5),
               view("c", queued=1, oldest_wait=1.0, fraction=0.5))
    assert d.actions == [Deactivate("b", 1, True, "making room for c", for_model="c")]


def test_model_checking_memory_before_its_start_reserves_its_gpus():
    d = decide(view("a", S.STOPPED, busy=True, queued=1, oldest_wait=1.0),
               view("b", queued=1, oldest_wait=2.0))
    assert d.actions == []


def test_target_waits_while_a_model_in_the_way_is_stopping():
    d = decide(view("a", S.STOPPING), view("b", queued=1, oldest_wait=1.0))
    assert d.actions == []
