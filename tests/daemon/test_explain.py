"""policy/explain.py on hand-built snapshots: the quantum left and why a model waits."""

from __future__ import annotations

import math
from typing import Any

from llmuxd.policy import make_policy
from llmuxd.policy.base import ModelView, PolicyInput
from llmuxd.policy.explain import explain
from llmuxd.policy.options import PolicyOptions
from llmuxd.states import ModelState as S


def view(name: str, state: S = S.STOPPED, **kw: Any) -> ModelView:
    base: dict[str, Any] = dict(name=name, state=state, busy=False, in_flight=0, queued=0,
                                oldest_wait=None, active_since=None, gpus=(0,),
                                fraction=0.9, sleep_level=1)
    if state is S.ACTIVE:
        base["active_since"] = 0.0
    base.update(kw)
    return ModelView(**base)


def run(policy: str, *views: ModelView, now: float = 100.0, min_active: float = 0.0) -> Any:
    inp = PolicyInput(models={v.name: v for v in views}, now=now, drain_before_switch=True,
                      min_active_secs=min_active, options=PolicyOptions())
    p = make_policy(policy)
    return explain(inp, p, p.decide(inp))


def test_a_waiter_behind_a_model_in_its_minimum_time_sees_the_time_left():
    e = run("fifo", view("a", S.ACTIVE, active_since=95.0, in_flight=1),
            view("b", S.SLEEPING, queued=2, oldest_wait=99.0), min_active=60.0)
    assert math.isclose(e["a"].quantum_left_s, 55.0)
    assert e["b"].reason == "quantum"
    assert e["b"].why == "'a' serves its quantum (55.0s left)"
    assert e["a"].why is None


def test_nobody_waiting_means_no_quantum_and_no_reason():
    e = run("adaptive", view("a", S.ACTIVE, in_flight=3), view("b", S.SLEEPING))
    assert e["a"].quantum_left_s is None and e["b"].why is None


def test_a_draining_model_in_the_way_is_named_with_its_requests_in_flight():
    e = run("fifo", view("a", S.DRAINING, in_flight=2),
            view("b", S.SLEEPING, queued=1, oldest_wait=99.0))
    assert (e["b"].reason, e["b"].why) == ("draining", "'a' is draining (2 in flight)")


def test_a_model_told_to_leave_now_is_switching_out():
    e = run("fifo", view("a", S.ACTIVE, active_since=0.0),
            view("b", S.SLEEPING, queued=1, oldest_wait=99.0))
    assert e["b"].reason == "switching_out"
    assert e["a"].quantum_left_s == 0.0


def test_a_pinned_model_and_a_waking_model_say_so():
    e = run("fifo", view("a", S.ACTIVE, pinned=True),
            view("b", S.SLEEPING, queued=1, oldest_wait=99.0),
            view("c", S.WAKING, queued=1, oldest_wait=98.0, gpus=(1,)))
    assert e["b"].reason == "pinned" and "pinned" in (e["b"].why or "")
    assert e["c"].reason == "switching_in"


def test_backoff_tells_when_the_next_start_is():
    e = run("fifo", view("a", S.BACKOFF, queued=1, oldest_wait=99.0, ready_at=104.0))
    assert e["a"].reason == "backoff" and "4.0s" in (e["a"].why or "")


def test_every_policy_explains_without_error():
    for policy in ("fifo", "cost_aware", "time_slice", "adaptive"):
        e = run(policy, view("a", S.ACTIVE, active_since=99.0, in_flight=1),
                view("b", S.SLEEPING, queued=1, oldest_wait=99.5))
        assert e["b"].why and e["b"].reason
