"""cost_aware, rule by rule (Rust llmux 0.9), on hand-built snapshots."""

from __future__ import annotations

from llmuxd.policy.base import Deactivate
from llmuxd.states import ModelState as S
from tests.policy.views import decide, view

SWITCH = Deactivate("a", 1, True, "making room for b", for_model="b")


def test_stale_waiter_switches_now_even_before_the_cost_is_served():
    d = decide("cost_aware", view("a", S.ACTIVE, active_since=99.0, in_flight=1),
               view("b", S.SLEEPING, queued=1, oldest_wait=85.0), now=100.0)
    assert d.actions == [SWITCH]


def test_idle_active_model_switches_now():
    d = decide("cost_aware", view("a", S.ACTIVE, active_since=99.0),
               view("b", S.SLEEPING, queued=1, oldest_wait=99.5), now=100.0)
    assert d.actions == [SWITCH]


def test_active_less_than_the_cost_defers_to_the_cost_then_switches_unconditionally():
    early = decide("cost_aware", view("a", S.ACTIVE, active_since=95.0, in_flight=1),
                   view("b", S.SLEEPING, queued=1, oldest_wait=99.0), now=100.0)
    assert early.actions == [] and early.recheck_at == 105.0      # default cost 10 s
    late = decide("cost_aware", view("a", S.ACTIVE, active_since=95.0, in_flight=1),
                  view("b", S.SLEEPING, queued=1, oldest_wait=99.0), now=105.0)
    assert late.actions == [SWITCH]


def test_enough_waiters_to_amortize_the_cost_switch_now():
    # cost 10 s x amortization 0.5 = 5 waiters
    d = decide("cost_aware", view("a", S.ACTIVE, active_since=50.0, in_flight=1),
               view("b", S.SLEEPING, queued=5, oldest_wait=99.0), now=100.0)
    assert d.actions == [SWITCH]


def test_too_few_waiters_coalesce_for_the_window():
    d = decide("cost_aware", view("a", S.ACTIVE, active_since=50.0, in_flight=1),
               view("b", S.SLEEPING, queued=4, oldest_wait=99.0), now=100.0)
    assert d.actions == [] and d.recheck_at == 101.0              # 99 + 2 s window


def test_measured_cost_of_the_direction_is_used():
    d = decide("cost_aware", view("a", S.ACTIVE, active_since=98.0, in_flight=1),
               view("b", S.SLEEPING, queued=1, oldest_wait=99.0), now=100.0,
               costs={("a", "b"): 3.0})
    assert d.recheck_at == 101.0                                  # 98 + 3 s


def test_min_active_secs_is_the_cooldown_of_every_switch():
    d = decide("cost_aware", view("a", S.ACTIVE, active_since=99.0),
               view("b", S.SLEEPING, queued=1, oldest_wait=99.5), now=100.0, min_active=5.0)
    assert d.actions == [] and d.recheck_at == 104.0


def test_it_always_drains_even_with_drain_before_switch_false():
    d = decide("cost_aware", view("a", S.ACTIVE, active_since=50.0),
               view("b", S.SLEEPING, queued=1, oldest_wait=99.0), drain=False)
    assert d.actions == [SWITCH]
