"""fifo's two defects from the review, fixed at the policy level (edge by edge)."""

from __future__ import annotations

from llmuxd.policy.base import Deactivate
from llmuxd.states import ModelState as S
from tests.policy.views import decide, view


def test_model_that_became_active_this_pass_is_not_deactivated_in_the_same_pass():
    # a's switch took 5 s and it became active just now; b's request is waiting.
    d = decide("fifo", view("a", S.ACTIVE, active_since=100.0, switched_in_secs=5.0,
                            in_flight=3),
               view("b", S.SLEEPING, queued=1, oldest_wait=99.0), now=100.0)
    assert d.actions == []
    assert d.recheck_at == 105.0


def test_active_model_leaves_once_it_served_as_long_as_its_switch_took():
    d = decide("fifo", view("a", S.ACTIVE, active_since=100.0, switched_in_secs=5.0),
               view("b", S.SLEEPING, queued=1, oldest_wait=99.0), now=105.0)
    assert d.actions == [Deactivate("a", 1, True, "making room for b", for_model="b")]


def test_min_active_secs_longer_than_the_switch_wins():
    d = decide("fifo", view("a", S.ACTIVE, active_since=100.0, switched_in_secs=5.0),
               view("b", S.SLEEPING, queued=1, oldest_wait=99.0), now=105.0, min_active=8.0)
    assert d.actions == [] and d.recheck_at == 108.0


def test_no_drain_with_leases_in_flight_drains_anyway_instead_of_sleeping_under_them():
    d = decide("fifo", view("a", S.ACTIVE, in_flight=2),
               view("b", S.SLEEPING, queued=1, oldest_wait=1.0), drain=False)
    assert d.actions == [Deactivate("a", 1, True, "making room for b", for_model="b")]


def test_no_drain_without_leases_in_flight_sleeps_at_once():
    d = decide("fifo", view("a", S.ACTIVE, in_flight=0),
               view("b", S.SLEEPING, queued=1, oldest_wait=1.0), drain=False)
    assert d.actions == [Deactivate("a", 1, False, "making room for b", for_model="b")]


def test_always_active_model_is_never_evicted():
    d = decide("fifo", view("a", S.ACTIVE, always_active=True),
               view("b", S.SLEEPING, queued=1, oldest_wait=1.0))
    assert d.actions == []
