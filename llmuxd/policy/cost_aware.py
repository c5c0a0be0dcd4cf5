"""``cost_aware``: the Rust llmux 0.9 policy, rule for rule.

For a model waiting behind the active one, with ``cost`` the switch-cost EMA of that
direction (``default_switch_secs`` until measured, samples capped at 60 s), checked
in order when its first request arrives:

1. the oldest request has waited ``max_wait_secs`` -> switch now;
2. the active model is idle -> switch now;
3. the active model has been active less than ``cost`` -> defer to that point;
4. ``queued >= max(1, ceil(amortization_factor * cost))`` -> switch now;
5. otherwise defer ``coalesce_window_ms`` (from that first request).

After a deferral the switch runs unconditionally (the original's behaviour, kept).
``min_active_secs`` delays every switch out (the original's cooldown); it always
drains. The original evaluated this once per arriving request; here the same times
are recomputed from the oldest request's arrival on every pass, which gives the
same answers without keeping state.
"""

from __future__ import annotations

import math

from llmuxd.policy.base import Deactivate, Decisions, ModelView, PolicyInput
from llmuxd.policy.switching import is_idle, plan

COST_CAP_SECS = 60.0


class CostAwarePolicy:
    name = "cost_aware"

    def decide(self, inp: PolicyInput) -> Decisions:
        return plan(inp, self)

    def order(self, inp: PolicyInput, target: ModelView) -> tuple[float, ...]:
        return (target.oldest_wait if target.oldest_wait is not None else inp.now,)

    def leave_at(self, inp: PolicyInput, target: ModelView, victim: ModelView) -> float:
        o = inp.options
        now = inp.now
        since = victim.active_since if victim.active_since is not None else now
        cooldown = since + inp.min_active_secs
        first = target.oldest_wait if target.oldest_wait is not None else now
        cost = min(inp.costs.get((victim.name, target.name), o.default_switch_secs),
                   COST_CAP_SECS)
        if now - first >= o.max_wait_secs or is_idle(victim):
            at = now
        elif first < since + cost:
            at = since + cost                       # 3: defer for the remainder
        elif target.queued >= max(1, math.ceil(o.amortization_factor * cost)):
            at = now                                # 4: enough to amortize
        else:
            at = first + o.coalesce_window_ms / 1000  # 5: coalesce
        at = min(at, first + o.max_wait_secs)
        return max(at, cooldown)

    def deactivate(self, inp: PolicyInput, target: ModelView, victim: ModelView) -> Deactivate:
        return Deactivate(victim.name, victim.sleep_level, True,
                          f"making room for {target.name}", for_model=target.name)
