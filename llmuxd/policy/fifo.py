"""The seed's ``fifo`` policy: switch as soon as a request waits for a model that is not active.

Targets are served in the order their oldest request arrived (``switching.plan``).
Two defects of the seed are fixed here, at the policy level:

* a model that just became active is not made to leave in the same pass: it stays
  at least as long as the switch into it took (``switched_in_secs``) or
  ``min_active_secs``, whichever is longer. Switching on demand served exactly one
  batch per switch; now a switch costs at most half of a contended GPU's time;
* ``drain_before_switch = false`` never puts a model to sleep under leases in flight
  (vLLM aborts or crashes them, vllm#45520): with requests in flight the model is
  drained anyway; ``false`` only skips the gate-closed wait when nothing is in flight
  (where the two are the same). With ``min_active_secs = 0`` the seed put each
  model to sleep one pass after granting its batch: a request longer than a tick
  never completed.
"""

from __future__ import annotations

from llmuxd.policy.base import Deactivate, Decisions, ModelView, PolicyInput
from llmuxd.policy.switching import (
    eviction_order,
    holds_or_will_hold,
    placed,
    plan,
)

__all__ = ["FifoPolicy", "eviction_order", "holds_or_will_hold", "placed"]


class FifoPolicy:
    name = "fifo"

    def decide(self, inp: PolicyInput) -> Decisions:
        return plan(inp, self)

    def order(self, inp: PolicyInput, target: ModelView) -> tuple[float, ...]:
        return (target.oldest_wait if target.oldest_wait is not None else inp.now,)

    def leave_at(self, inp: PolicyInput, target: ModelView, victim: ModelView) -> float:
        since = victim.active_since if victim.active_since is not None else inp.now
        return since + max(inp.min_active_secs, victim.switched_in_secs)

    def deactivate(self, inp: PolicyInput, target: ModelView, victim: ModelView) -> Deactivate:
        drain = inp.drain_before_switch or victim.in_flight > 0
        return Deactivate(victim.name, victim.sleep_level, drain,
                          f"making room for {target.name}", for_model=target.name)
