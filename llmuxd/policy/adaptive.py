"""``adaptive`` (ours): exhaustive visits bounded by a deadline, early switches when idle.

Derived from what the simulator (``llmuxd.policy.simulate``) shows: with vLLM's
batching, a switch costs its sleep + wake (``S``) *and* the drain of the batch in
flight, while requests that arrive for the active model cost nothing to admit. So:

* **Stay while busy, up to a deadline.** A busy active model keeps the GPU until
  a waiting model's oldest request is *due* (``max_wait_secs`` old), and at least
  ``min_quantum_ms`` and as long as the switch into it took (``switched_in_secs``:
  a visit shorter than its switch spends most of the GPU on switching).
* **Bounded drains.** A switch made for a due waiter drains at most
  ``DUE_DRAIN_FRACTION x max_wait_secs`` (at least ``min_quantum_ms``; only when
  requests have a timeout): one long
  generation on the active model must not hold every other model's waiters into
  their timeout (the simulator's 504 cascades); the request cut there still returns
  what it produced. With ``drain + sleep < max_wait`` the victim's own waiters (they
  arrive after the drain began) are never due when the GPU frees, so the switch
  goes to the model it was made for.
* **Leave early when idle,** after lingering ``linger_factor x S / q^2`` (``q``:
  the target's waiters): a lone waiter is worth a linger (a request for the active
  model that arrives meanwhile saves two switches); a queue is not: beyond
  ``LINGER_MAX_WAITERS`` it leaves at once (a linger of a tenth of a switch almost
  never catches a request and delays every waiter).
* **Next model:** a model *overdue* (its oldest waiter ``2 x max_wait_secs`` old)
  whose oldest waiter can still be admitted before its timeout goes first, oldest
  first: nobody is overtaken forever. Then among due models the one with the most
  waiters (most requests per switch: when several are due at once the box is
  overloaded and every switch must count), then the oldest; models not yet due by
  waiting work x age (sum of the ages of the waiters, ``wait_age_sum``).
* **No switch for nobody:** a target whose newest waiter would time out
  (``request_timeout_secs``) before the switch could end is not switched to
  (the seed's "abandoned" switches).
* It always drains (never sleeps under leases in flight). ``min_active_secs`` is
  the operator's floor and wins over the deadline.

``S`` is ``switching.switch_cost``: the EMA of the direction, else the per-level
wake/cold-start estimate, else ``default_switch_secs``. The wait bound this gives is
in docs/scheduling.md ("The wait bound").
"""

from __future__ import annotations

import math

from llmuxd.policy.base import Deactivate, Decisions, ModelView, PolicyInput
from llmuxd.policy.switching import NEVER, is_idle, plan, switch_cost, waiting_targets
from llmuxd.states import ModelState

__all__ = ["DUE_DRAIN_FRACTION", "AdaptivePolicy"]

# A switch made for a due waiter drains at most this x max_wait_secs (see above).
DUE_DRAIN_FRACTION = 2 / 3
# An idle model lingers only for this many waiters or fewer (see above).
LINGER_MAX_WAITERS = 4


class AdaptivePolicy:
    name = "adaptive"

    def decide(self, inp: PolicyInput) -> Decisions:
        return plan(inp, _Round(inp))


class _Round:
    """One decision pass: the due time of every waiting model, computed once."""

    def __init__(self, inp: PolicyInput) -> None:
        self.due = {t.name: _first(inp, t) + inp.options.max_wait_secs
                    for t in waiting_targets(inp)}
        self.holder = next((m for m in inp.models.values()
                            if m.state in (ModelState.ACTIVE, ModelState.DRAINING)), None)

    def order(self, inp: PolicyInput, target: ModelView) -> tuple[float, ...]:
        due = self.due.get(target.name, NEVER)
        if due + inp.options.max_wait_secs <= inp.now and self.savable(inp, target):
            return (0.0, 0.0, due)      # overdue: oldest first, no one overtakes it twice
        if due <= inp.now:
            return (1.0, -float(target.queued), due)
        age = target.waiting_age(inp.now)
        work = target.wait_age_sum if target.wait_age_sum is not None \
            else target.queued * age
        return (2.0, -work, 0.0)

    def savable(self, inp: PolicyInput, target: ModelView) -> bool:
        """Can its oldest waiter still be admitted before its timeout if it goes next?

        (A hopeless one gets no priority: in an overload, switching for requests that
        time out on the way only makes the others time out too.)
        """
        if self.holder is not None:
            cost = switch_cost(inp, self.holder, target)
        else:
            cost = target.wake_secs if target.wake_secs is not None \
                else inp.options.default_switch_secs
        drain = DUE_DRAIN_FRACTION * inp.options.max_wait_secs
        return _first(inp, target) + inp.request_timeout_secs > inp.now + drain + cost

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
            q = max(1, target.queued)
            linger = o.linger_factor * cost / q ** 2 if q <= LINGER_MAX_WAITERS else 0.0
            at = min(due, idle_since + linger)
        else:
            at = max(due, since + max(o.min_quantum_ms / 1000, victim.switched_in_secs))
        return max(at, since + inp.min_active_secs)

    def deactivate(self, inp: PolicyInput, target: ModelView, victim: ModelView) -> Deactivate:
        due = self.due.get(target.name, NEVER)
        why = "due" if due <= inp.now else "idle"
        cap = None
        if why == "due" and inp.request_timeout_secs != math.inf:
            # never below min_quantum_ms: max_wait_secs = 0 must not cut every generation
            cap = max(DUE_DRAIN_FRACTION * inp.options.max_wait_secs,
                      inp.options.min_quantum_ms / 1000)
        return Deactivate(victim.name, victim.sleep_level, True,
                          f"making room for {target.name} ({why})", for_model=target.name,
                          drain_secs=cap)


def _first(inp: PolicyInput, m: ModelView) -> float:
    return m.oldest_wait if m.oldest_wait is not None else inp.now

