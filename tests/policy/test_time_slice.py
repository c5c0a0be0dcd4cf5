"""time_slice, rule by rule (Rust llmux 0.9), on hand-built snapshots."""

from __future__ import annotations

from llmuxd.policy.base import Activate, Deactivate
from llmuxd.states import ModelState as S
from tests.policy.views import decide, view


def test_busy_active_model_keeps_the_gpu_and_is_checked_at_the_next_tick():
    d = decide("time_slice", view("a", S.ACTIVE, in_flight=2),
               view("b", S.SLEEPING, queued=3, oldest_wait=99.0), now=100.2)
    assert d.actions == [] and d.recheck_at == 100.5


def test_stale_waiter_takes_over_a_busy_model():
    d = decide("time_slice", view("a", S.ACTIVE, in_flight=2),
               view("b", S.SLEEPING, queued=1, oldest_wait=85.0), now=100.0)
    assert d.actions == [Deactivate("a", 1, True, "making room for b", for_model="b")]


def test_single_waiter_is_not_starved_by_a_busy_model():
    # the original checked staleness only when a request arrived; here on every pass
    d = decide("time_slice", view("a", S.ACTIVE, in_flight=9),
               view("b", S.SLEEPING, queued=1, oldest_wait=0.0), now=1000.0)
    assert d.actions == [Deactivate("a", 1, True, "making room for b", for_model="b")]


def test_idle_active_model_leaves_after_min_active():
    early = decide("time_slice", view("a", S.ACTIVE, active_since=99.0),
                   view("b", S.SLEEPING, queued=1, oldest_wait=99.5), now=100.0,
                   min_active=5.0)
    assert early.actions == [] and early.recheck_at == 104.0
    late = decide("time_slice", view("a", S.ACTIVE, active_since=99.0),
                  view("b", S.SLEEPING, queued=1, oldest_wait=99.5), now=104.0,
                  min_active=5.0)
    assert late.actions == [Deactivate("a", 1, True, "making room for b", for_model="b")]


def test_longest_queue_goes_first():
    d = decide("time_slice", view("b", queued=1, oldest_wait=1.0),
               view("c", queued=4, oldest_wait=50.0))
    assert d.actions == [Activate("c", "requests waiting")]
