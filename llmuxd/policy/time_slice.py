"""``time_slice``: the Rust llmux 0.9 policy, rule for rule.

A waiting model takes over when its oldest request is stale (``max_wait_secs``),
or, checked every ``tick_interval_ms``, when the active model has been active
``min_active_secs`` with nothing in flight and nothing queued; among several
waiting models the longest queue goes first. It always drains. ``min_quantum_ms``
is accepted and unused, as in the original.

One deviation: the original checked staleness only when a request arrived, so a
single waiter could starve behind a busy model; here it is checked on every pass
(a starving waiter is a bug, not a property worth keeping for comparison).
"""

from __future__ import annotations

import math

from llmuxd.policy.base import Deactivate, Decisions, ModelView, PolicyInput
from llmuxd.policy.switching import is_idle, plan


class TimeSlicePolicy:
    name = "time_slice"

    def decide(self, inp: PolicyInput) -> Decisions:
        return plan(inp, self)

    def order(self, inp: PolicyInput, target: ModelView) -> tuple[float, ...]:
        return (-target.queued,
                target.oldest_wait if target.oldest_wait is not None else inp.now)

    def leave_at(self, inp: PolicyInput, target: ModelView, victim: ModelView) -> float:
        o = inp.options
        now = inp.now
        since = victim.active_since if victim.active_since is not None else now
        first = target.oldest_wait if target.oldest_wait is not None else now
        stale = max(first + o.max_wait_secs, since + inp.min_active_secs)
        tick = o.tick_interval_ms / 1000
        next_tick = math.ceil(now / tick - 1e-9) * tick
        if is_idle(victim):
            return min(stale, max(now, since + inp.min_active_secs))
        return min(stale, next_tick + tick if next_tick <= now else next_tick)

    def deactivate(self, inp: PolicyInput, target: ModelView, victim: ModelView) -> Deactivate:
        return Deactivate(victim.name, victim.sleep_level, True,
                          f"making room for {target.name}", for_model=target.name)
