"""adaptive, edge by edge, on hand-built snapshots."""

from __future__ import annotations

from llmuxd.policy.base import Activate, Deactivate
from llmuxd.states import ModelState as S
from tests.policy.views import decide, view


def out(reason: str) -> Deactivate:
    return Deactivate("a", 1, True, f"making room for b ({reason})", for_model="b")


def test_busy_model_keeps_the_gpu_until_the_waiter_is_due():
    d = decide("adaptive", view("a", S.ACTIVE, active_since=10.0, in_flight=4),
               view("b", S.SLEEPING, queued=6, oldest_wait=90.0, wake_secs=1.0), now=100.0)
    assert d.actions == [] and d.recheck_at == 105.0          # 90 + max_wait 15


def test_due_waiter_takes_over_a_busy_model():
    d = decide("adaptive", view("a", S.ACTIVE, active_since=10.0, in_flight=4),
               view("b", S.SLEEPING, queued=1, oldest_wait=85.0, wake_secs=1.0), now=100.0)
    assert d.actions == [out("due")]


def test_single_request_among_heavy_traffic_is_due_like_any_other():
    d = decide("adaptive", view("a", S.ACTIVE, active_since=0.0, in_flight=200, queued=0),
               view("b", S.SLEEPING, queued=1, oldest_wait=85.0, wake_secs=8.0), now=100.0)
    assert d.actions == [out("due")]


def test_busy_model_serves_at_least_min_quantum():
    d = decide("adaptive", view("a", S.ACTIVE, active_since=99.5, in_flight=1),
               view("b", S.SLEEPING, queued=1, oldest_wait=80.0, wake_secs=1.0), now=100.0)
    assert d.actions == [] and d.recheck_at == 101.5          # min_quantum 2 s


def test_idle_model_lingers_for_a_lone_waiter():
    # S = 1 s (wake estimate): linger 3 x S / 1^2 from when it became idle
    d = decide("adaptive", view("a", S.ACTIVE, active_since=0.0, idle_since=99.0),
               view("b", S.SLEEPING, queued=1, oldest_wait=99.5, wake_secs=1.0), now=100.0)
    assert d.actions == [] and d.recheck_at == 102.0


def test_idle_model_leaves_at_once_for_a_queue():
    d = decide("adaptive", view("a", S.ACTIVE, active_since=0.0, idle_since=99.9),
               view("b", S.SLEEPING, queued=10, oldest_wait=99.5, wake_secs=1.0), now=100.0)
    assert d.actions == [out("idle")]


def test_measured_direction_cost_wins_over_the_wake_estimate():
    # measured 0.2 s: the 0.6 s linger is over (the 1 s estimate would linger to 102)
    d = decide("adaptive", view("a", S.ACTIVE, active_since=0.0, idle_since=99.0),
               view("b", S.SLEEPING, queued=1, oldest_wait=99.5, wake_secs=1.0), now=100.0,
               costs={("a", "b"): 0.2})
    assert d.actions == [out("idle")]


def test_no_switch_for_waiters_that_time_out_before_it_ends():
    # the newest waiter arrived 55 s ago, the timeout is 60 s, the switch takes 8 s
    d = decide("adaptive", view("a", S.ACTIVE, active_since=0.0, in_flight=3),
               view("b", S.SLEEPING, queued=2, oldest_wait=40.0, newest_wait=45.0,
                    wake_secs=8.0), now=100.0)
    assert d.actions == [] and d.recheck_at is None


def test_due_models_go_first_oldest_first():
    d = decide("adaptive", view("b", queued=9, oldest_wait=95.0),
               view("c", queued=1, oldest_wait=80.0))
    assert d.actions == [Activate("c", "requests waiting")]


def test_among_models_not_yet_due_more_waiting_work_goes_first():
    d = decide("adaptive", view("b", queued=1, oldest_wait=95.0, wait_age_sum=5.0),
               view("c", queued=3, oldest_wait=97.0, wait_age_sum=7.0))
    assert d.actions == [Activate("c", "requests waiting")]


def test_min_active_secs_wins_over_the_deadline():
    d = decide("adaptive", view("a", S.ACTIVE, active_since=99.0, in_flight=1),
               view("b", S.SLEEPING, queued=1, oldest_wait=80.0, wake_secs=1.0), now=100.0,
               min_active=30.0)
    assert d.actions == [] and d.recheck_at == 129.0


def test_it_always_drains_even_with_drain_before_switch_false():
    d = decide("adaptive", view("a", S.ACTIVE, in_flight=2),
               view("b", S.SLEEPING, queued=1, oldest_wait=50.0, wake_secs=1.0), drain=False)
    assert d.actions == [out("due")]
