"""What every policy shares: who waits, who is in its way, and who goes first.

A policy here is a *rule*: an order among the models that wait, and for each model
in a waiter's way the time at which it may be made to leave. ``plan`` turns a rule
into decisions the same way for all of them: targets that may take over now go first
(in the rule's order), a target that must wait reserves its GPUs so that a later one
cannot overtake it (the original's switch lock, expressed as data), and placement
(fractions per GPU) says who is in the way. Everything is pure: no clock, no I/O.
"""

from __future__ import annotations

import math
from typing import Protocol

from llmuxd.placement import Placed, victims
from llmuxd.policy.base import Activate, Deactivate, Decision, Decisions, ModelView, PolicyInput
from llmuxd.states import ModelState

S = ModelState
HOLDING = frozenset({S.ACTIVE, S.DRAINING, S.STARTING, S.WAKING, S.STOPPING})
ACTIVATABLE = frozenset({S.STOPPED, S.SLEEPING, S.BACKOFF})
NEVER = math.inf


def placed(m: ModelView) -> Placed:
    return Placed(m.name, m.gpus, m.fraction)


def holds_or_will_hold(m: ModelView) -> bool:
    """On its GPUs now, or about to be (busy while not holding = checking memory to start)."""
    return m.state in HOLDING or (m.busy and m.state in ACTIVATABLE)


def eviction_order(m: ModelView) -> tuple[int, float]:
    """Idle active models leave first, then busy ones; moving or pinned ones last."""
    if not m.evictable():
        rank = 4
    elif m.state is S.ACTIVE and not m.busy:
        rank = 0 if m.queued == 0 and m.in_flight == 0 else 1
    elif m.state is S.DRAINING:
        rank = 2
    else:
        rank = 3
    return rank, m.active_since or 0.0


def is_idle(m: ModelView) -> bool:
    """Active with nothing in flight and nobody waiting for it."""
    return m.in_flight == 0 and m.queued == 0


def switch_cost(inp: PolicyInput, victim: ModelView, target: ModelView) -> float:
    """Expected seconds of GPU time for victim -> target (sleep + wake/start, no drain).

    The measured EMA of that direction first; else the per-level estimates the
    daemon knows (victim's sleep, target's wake or cold start); else the default.
    """
    measured = inp.costs.get((victim.name, target.name))
    if measured is not None:
        return measured
    if target.wake_secs is not None:
        return target.wake_secs + (victim.sleep_secs or 0.0)
    return inp.options.default_switch_secs


class SwitchRule(Protocol):
    """The part of a policy that differs: an order and a time to leave."""

    def order(self, inp: PolicyInput, target: ModelView) -> tuple[float, ...]:
        """Sort key among targets that may go now (lowest first)."""
        ...

    def leave_at(self, inp: PolicyInput, target: ModelView, victim: ModelView) -> float:
        """When the ACTIVE ``victim`` may be made to leave for ``target`` (NEVER: not by us)."""
        ...

    def deactivate(self, inp: PolicyInput, target: ModelView, victim: ModelView) -> Deactivate:
        """The decision that makes ``victim`` leave for ``target``."""
        ...


def waiting_targets(inp: PolicyInput) -> list[ModelView]:
    return [m for m in inp.models.values()
            if m.queued > 0 and m.state in ACTIVATABLE and not m.busy]


def plan(inp: PolicyInput, rule: SwitchRule) -> Decisions:
    """Decisions for ``inp`` under ``rule`` (see the module docstring)."""
    views, now = inp.models, inp.now
    recheck: float | None = None
    entries: list[tuple[bool, tuple[float, ...], str, ModelView, float]] = []
    for t in waiting_targets(inp):
        if t.state is S.BACKOFF and now < t.ready_at:
            recheck = earliest(recheck, t.ready_at)
            continue
        at = now
        for name in victims(placed(t), [placed(h) for h in _holders(views, t)]):
            v = views[name]
            if v.state is S.ACTIVE and not v.busy and v.evictable():
                at = max(at, rule.leave_at(inp, t, v))
        entries.append((at > now, rule.order(inp, t), t.name, t, at))
    entries.sort(key=lambda e: (e[0], e[1], e[2]))

    actions: list[Decision] = []
    leaving: set[str] = set()
    reserved: list[Placed] = []
    for late, _key, _name, t, at in entries:
        blockers = victims(placed(t), [placed(h) for h in _holders(views, t)] + reserved)
        if not blockers:
            actions.append(Activate(t.name, "requests waiting"))
            reserved.append(placed(t))
            continue
        if late:
            if at < NEVER:
                recheck = earliest(recheck, at)
        else:
            for name in blockers:
                b = views.get(name)
                if b is None or name in leaving or b.busy or not b.evictable() \
                        or b.state is not S.ACTIVE:
                    continue        # a reservation, or already on its way: wait
                actions.append(rule.deactivate(inp, t, b))
                leaving.add(name)
        reserved.append(placed(t))
    return Decisions(actions, recheck)


def _holders(views: dict[str, ModelView], t: ModelView) -> list[ModelView]:
    return sorted((m for m in views.values() if m.name != t.name and holds_or_will_hold(m)),
                  key=eviction_order)


def earliest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)
