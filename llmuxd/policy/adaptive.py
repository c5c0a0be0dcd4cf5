"""``adaptive`` (ours): exhaustive visits bounded by a deadline, early switches when idle.

Derived from what the simulator (``llmuxd.policy.simulate``) shows: with vLLM's
batching, a switch costs its sleep + wake (``S``) *and* the drain of the batch in
flight, while requests that arrive for the active model cost nothing to admit. So:

* **Stay while busy, up to a deadline.** A busy active model keeps the GPU until
  a waiting model's oldest request is *due* (``max_wait_secs`` old); never less
  than ``min_quantum_ms``. Switching on a timer instead (fifo's "as long as the
  switch took", cost_aware's "cost", a quantum of k x S) only adds switches:
  the drain makes every visit longer than planned anyway.
* **Leave early when idle,** after lingering ``linger_factor x S / q^2`` (``q``:
  the target's waiters): a lone waiter is worth a short linger (a request for the
  active model that arrives meanwhile saves two switches); a queue is not.
* **Next model:** due models first, oldest first; then by waiting work x age
  (sum of the ages of the waiters, ``wait_age_sum``).
* **No switch for nobody:** a target whose newest waiter would time out
  (``request_timeout_secs``) before the switch could end is not switched to
  (the seed's "abandoned" switches).
* It always drains (never sleeps under leases in flight). ``min_active_secs`` is
  the operator's floor and wins over the deadline.

``S`` is ``switching.switch_cost``: the EMA of the direction, else the per-level
wake/cold-start estimate, else ``default_switch_secs``.
"""

from __future__ import annotations

from llmuxd.policy.base import Deactivate, Decisions, ModelView, PolicyInput
from llmuxd.policy.switching import NEVER, is_idle, plan, switch_cost, waiting_targets

__all__ = ["AdaptivePolicy"]


class AdaptivePolicy:
    name = "adaptive"

    def decide(self, inp: PolicyInput) -> Decisions:
        return plan(inp, _Round(inp))


class _Round:
    """One decision pass: the due time of every waiting model, computed once."""

    def __init__(self, inp: PolicyInput) -> None:
        self.due = {t.name: _first(inp, t) + inp.options.max_wait_secs
                    for t in waiting_targets(inp)}

    def order(self, inp: PolicyInput, target: ModelView) -> tuple[float, ...]:
        due = self.due.get(target.name, NEVER)
        if due <= inp.now:
            return (0.0, due)
        age = target.waiting_age(inp.now)
        work = target.wait_age_sum if target.wait_age_sum is not None \
            else target.queued * age
        return (1.0, -work)

    def leave_at(self, inp: PolicyInput, target: ModelView, victim: ModelView) -> float:
        """The deadline, or (idle) the end of a short linger; never before the floors."""
        o = inp.options
        now = inp.now
        since = victim.active_since if victim.active_since is not None else now
        cost = switch_cost(inp, victim, target)
        due = self.due.get(target.name, NEVER)
        newest = target.newest_wait if target.newest_wait is not None else _first(inp, target)
        if newest + inp.request_timeout_secs < now + cost:
            return NEVER        # every waiter times out before the switch ends: no switch
        if is_idle(victim):
            idle_since = victim.idle_since if victim.idle_since is not None else now
            # lingering costs every waiter of the target; worth it for a few only
            at = min(due, idle_since + o.linger_factor * cost / max(1, target.queued) ** 2)
        else:
            at = max(due, since + o.min_quantum_ms / 1000)
        return max(at, since + inp.min_active_secs)

    def deactivate(self, inp: PolicyInput, target: ModelView, victim: ModelView) -> Deactivate:
        due = self.due.get(target.name, NEVER)
        why = "due" if due <= inp.now else "idle"
        return Deactivate(victim.name, victim.sleep_level, True,
                          f"making room for {target.name} ({why})", for_model=target.name)


def _first(inp: PolicyInput, m: ModelView) -> float:
    return m.oldest_wait if m.oldest_wait is not None else inp.now

