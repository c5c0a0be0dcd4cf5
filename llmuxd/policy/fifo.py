"""The seed's ``fifo`` policy: switch as soon as a request waits for a model that is not active.

Targets are served in the order their oldest request arrived. A target that must
wait for room reserves its place, so a later request for a model that would take
the same GPUs cannot overtake it (the original's switch lock, expressed as data).
Models in the way are drained first when ``drain_before_switch`` and never before
they have been active ``min_active_secs``.
"""

from __future__ import annotations

from llmuxd.placement import Placed, victims
from llmuxd.policy.base import Activate, Deactivate, Decision, Decisions, ModelView, PolicyInput
from llmuxd.states import ModelState

S = ModelState
HOLDING = frozenset({S.ACTIVE, S.DRAINING, S.STARTING, S.WAKING, S.STOPPING})
ACTIVATABLE = frozenset({S.STOPPED, S.SLEEPING, S.BACKOFF})


def placed(m: ModelView) -> Placed:
    return Placed(m.name, m.gpus, m.fraction)


def holds_or_will_hold(m: ModelView) -> bool:
    """On its GPUs now, or about to be (busy while not holding = checking memory to start)."""
    return m.state in HOLDING or (m.busy and m.state in ACTIVATABLE)


def eviction_order(m: ModelView) -> tuple[int, float]:
    """Idle active models leave first, then busy ones; moving or pinned ones last."""
    if m.pinned:
        rank = 4
    elif m.state is S.ACTIVE and not m.busy:
        rank = 0 if m.queued == 0 and m.in_flight == 0 else 1
    elif m.state is S.DRAINING:
        rank = 2
    else:
        rank = 3
    return rank, m.active_since or 0.0


class FifoPolicy:
    name = "fifo"

    def decide(self, inp: PolicyInput) -> Decisions:
        views = inp.models
        actions: list[Decision] = []
        recheck: float | None = None
        leaving: set[str] = set()
        reserved: list[Placed] = []
        targets = sorted(
            (m for m in views.values()
             if m.queued > 0 and m.state in ACTIVATABLE and not m.busy),
            key=lambda m: (m.oldest_wait if m.oldest_wait is not None else inp.now, m.name),
        )
        for t in targets:
            if t.state is S.BACKOFF and inp.now < t.ready_at:
                recheck = _earliest(recheck, t.ready_at)
                continue
            holders = sorted((m for m in views.values()
                              if m.name != t.name and holds_or_will_hold(m)),
                             key=eviction_order)
            blockers = victims(placed(t), [placed(h) for h in holders] + reserved)
            if not blockers:
                actions.append(Activate(t.name, "requests waiting"))
                reserved.append(placed(t))
                continue
            for name in blockers:
                v = views.get(name)
                if v is None or name in leaving or v.busy or v.pinned or v.state is not S.ACTIVE:
                    continue        # a reservation, or already on its way: wait
                since = v.active_since if v.active_since is not None else inp.now
                if inp.now - since < inp.min_active_secs:
                    recheck = _earliest(recheck, since + inp.min_active_secs)
                    continue
                actions.append(Deactivate(name, v.sleep_level, inp.drain_before_switch,
                                          f"making room for {t.name}", for_model=t.name))
                leaving.add(name)
            reserved.append(placed(t))
        return Decisions(actions, recheck)


def _earliest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)
