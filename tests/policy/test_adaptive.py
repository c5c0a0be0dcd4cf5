"""adaptive, edge by edge, on hand-built snapshots."""

from __future__ import annotations

import math

from llmuxd.policy import make_policy
from llmuxd.policy.base import Activate, Deactivate, PolicyInput
from llmuxd.states import ModelState as S
from tests.policy.views import decide, view


def out(reason: str) -> Deactivate:
    # a switch for a due waiter drains at most 2/3 x max_wait (15 s): 10 s
    return Deactivate("a", 1, True, f"making room for b ({reason})", for_model="b",
                      drain_secs=10.0 if reason == "due" else None)


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
    # S = 1 s (wake estimate): linger 6 x S / 1^2 from when it became idle
    d = decide("adaptive", view("a", S.ACTIVE, active_since=0.0, idle_since=99.0),
               view("b", S.SLEEPING, queued=1, oldest_wait=99.5, wake_secs=1.0), now=100.0)
    assert d.actions == [] and d.recheck_at == 105.0


def test_idle_model_leaves_at_once_for_a_queue():
    d = decide("adaptive", view("a", S.ACTIVE, active_since=0.0, idle_since=99.9),
               view("b", S.SLEEPING, queued=10, oldest_wait=99.5, wake_secs=1.0), now=100.0)
    assert d.actions == [out("idle")]


def test_measured_direction_cost_wins_over_the_wake_estimate():
    # measured 0.1 s: the 0.6 s linger is over (the 1 s estimate would linger to 105)
    d = decide("adaptive", view("a", S.ACTIVE, active_since=0.0, idle_since=99.0),
               view("b", S.SLEEPING, queued=1, oldest_wait=99.5, wake_secs=1.0), now=100.0,
               costs={("a", "b"): 0.1})
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


def test_a_due_switch_drains_at_most_two_thirds_of_max_wait():
    d = decide("adaptive", view("a", S.ACTIVE, in_flight=1),
               view("b", S.SLEEPING, queued=1, oldest_wait=50.0, wake_secs=1.0),
               max_wait_secs=30.0)
    assert [a.drain_secs for a in d.actions if isinstance(a, Deactivate)] == [20.0]


def test_without_a_request_timeout_the_drain_is_not_capped():
    inp = PolicyInput(models={v.name: v for v in (
        view("a", S.ACTIVE, in_flight=1),
        view("b", S.SLEEPING, queued=1, oldest_wait=50.0, wake_secs=1.0))},
        now=100.0, drain_before_switch=True, min_active_secs=0.0,
        request_timeout_secs=math.inf)
    d = make_policy("adaptive").decide(inp)
    assert [a.drain_secs for a in d.actions if isinstance(a, Deactivate)] == [None]


def test_a_busy_model_stays_as_long_as_the_switch_into_it_took():
    # the waiter is due, but a came in 3 s ago over an 8 s switch: it serves until 105
    d = decide("adaptive", view("a", S.ACTIVE, active_since=97.0, in_flight=2,
                                switched_in_secs=8.0),
               view("b", S.SLEEPING, queued=1, oldest_wait=80.0, wake_secs=8.0), now=100.0)
    assert d.actions == [] and d.recheck_at == 105.0


def test_among_due_models_the_longest_queue_goes_first():
    d = decide("adaptive", view("b", queued=1, oldest_wait=80.0),
               view("c", queued=5, oldest_wait=84.0))
    assert d.actions == [Activate("c", "requests waiting")]


def test_an_overdue_model_goes_before_a_longer_queue():
    # b has waited 2 x max_wait: nobody may overtake it again (no starvation)
    d = decide("adaptive", view("b", queued=1, oldest_wait=70.0),
               view("c", queued=50, oldest_wait=84.0))
    assert d.actions == [Activate("b", "requests waiting")]


def test_an_idle_model_does_not_linger_for_more_than_four_waiters():
    # 4 waiters: 6 x 1 s / 16 from 99.9; 5 waiters: at once
    d = decide("adaptive", view("a", S.ACTIVE, active_since=0.0, idle_since=99.9),
               view("b", S.SLEEPING, queued=4, oldest_wait=99.5, wake_secs=1.0), now=100.0)
    assert d.actions == [] and d.recheck_at == 99.9 + 6.0 / 16
    d = decide("adaptive", view("a", S.ACTIVE, active_since=0.0, idle_since=99.9),
               view("b", S.SLEEPING, queued=5, oldest_wait=99.5, wake_secs=1.0), now=100.0)
    assert d.actions == [out("idle")]


def test_an_overdue_model_whose_oldest_waiter_cannot_be_saved_gets_no_priority():
    # b's oldest is 55 s old: with a 10 s drain and a 1 s wake it times out (60 s) on
    # the way; the longer queue goes first
    d = decide("adaptive", view("b", queued=1, oldest_wait=45.0, wake_secs=1.0),
               view("c", queued=50, oldest_wait=84.0, wake_secs=1.0))
    assert d.actions == [Activate("c", "requests waiting")]


def test_the_due_drain_is_never_shorter_than_min_quantum():
    # max_wait_secs = 0 (switch as soon as anyone waits) must not cut every generation
    d = decide("adaptive", view("a", S.ACTIVE, in_flight=1),
               view("b", S.SLEEPING, queued=1, oldest_wait=99.0, wake_secs=1.0),
               max_wait_secs=0.0)
    assert [a.drain_secs for a in d.actions if isinstance(a, Deactivate)] == [2.0]
