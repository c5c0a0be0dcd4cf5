"""Why a model waits and how long the active one keeps its GPU (pure, for status).

``explain(inp, policy, decisions)`` reads the same snapshot the policy decided on
and says, per model, what an operator asks first when a request is slow: *why is
it waiting* (the model in its way is draining, serving its quantum, waking...) and,
for an active model that others wait behind, *how much of its quantum is left*.
It never decides anything; the quantum comes from the policy's own rule
(``leave_at``, see switching.SwitchRule) when it has one, so status cannot drift
from what the policy does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmuxd.placement import victims
from llmuxd.policy.base import Activate, Deactivate, Decisions, ModelView, Policy, PolicyInput
from llmuxd.policy.switching import ACTIVATABLE, holds_or_will_hold, placed
from llmuxd.states import ModelState

S = ModelState


@dataclass(frozen=True)
class Explained:
    """One model's scheduling facts for ``llmuxctl status`` and the metrics."""

    quantum_left_s: float | None = None   # ACTIVE and others wait: time before it may leave
    why: str | None = None                # waiting (queued > 0, not serving): the reason
    reason: str | None = None             # the same as a short label (a metric label)


def explain(inp: PolicyInput, policy: Policy, decisions: Decisions | None) -> dict[str, Explained]:
    """Per model: its quantum left (if others wait behind it) and why it waits (if it does)."""
    views, now = inp.models, inp.now
    acts = decisions.actions if decisions is not None else []
    activating = {a.model for a in acts if isinstance(a, Activate)}
    leaving = {d.model for d in acts if isinstance(d, Deactivate)}
    leave_at = getattr(policy, "leave_at", None)
    quantum: dict[str, float] = {}
    blocked_by: dict[str, list[ModelView]] = {}
    waiting = sorted((m for m in views.values() if m.queued > 0 and m.state is not S.ACTIVE),
                     key=lambda m: (m.oldest_wait if m.oldest_wait is not None else now, m.name))
    for t in waiting:
        holders = [h for h in views.values() if h.name != t.name and holds_or_will_hold(h)]
        names = victims(placed(t), [placed(h) for h in holders])
        blocked_by[t.name] = [views[n] for n in names if n in views]
        if t.state not in ACTIVATABLE or t.busy:
            continue
        for v in blocked_by[t.name]:
            if v.state is not S.ACTIVE or v.busy or not v.evictable() or leave_at is None:
                continue
            at = float(leave_at(inp, t, v))
            left = max(0.0, at - now) if math.isfinite(at) else math.inf
            quantum[v.name] = min(quantum.get(v.name, math.inf), left)
    out: dict[str, Explained] = {}
    for name, m in views.items():
        q = quantum.get(name)
        why, reason = (None, None)
        if m.queued > 0 and m.state is not S.ACTIVE:
            why, reason = _why(m, now, blocked_by.get(name, []), activating, leaving, quantum,
                               waiting)
        out[name] = Explained(quantum_left_s=None if q is None else q, why=why, reason=reason)
    return out


def _why(t: ModelView, now: float, blockers: list[ModelView], activating: set[str],
         leaving: set[str], quantum: dict[str, float], waiting: list[ModelView]
         ) -> tuple[str, str]:
    state = t.state
    if state is S.FAILED:
        return "held failed after repeated start failures", "failed"
    if state is S.BACKOFF and now < t.ready_at:
        return f"its last start failed; next try in {t.ready_at - now:.1f}s", "backoff"
    if state in (S.STARTING, S.WAKING):
        return f"{state}", "switching_in"
    if state is S.DRAINING:
        return "it is leaving the GPU; it comes back on its next turn", "leaving"
    if state is S.STOPPING:
        return "it is stopping; it starts again after", "leaving"
    if t.busy or t.name in activating:
        return "checking GPU memory before it comes in", "switching_in"
    parts: list[str] = []
    reason = "queued"
    for b in blockers:
        if b.state is S.DRAINING:
            parts.append(f"'{b.name}' is draining ({b.in_flight} in flight)")
            reason = "draining"
        elif b.state in (S.STARTING, S.WAKING, S.STOPPING) or b.busy:
            parts.append(f"'{b.name}' is {'leaving' if b.name in leaving else b.state}")
            reason = "switching_out" if reason == "queued" else reason
        elif b.state is S.ACTIVE and not b.evictable():
            what = "pinned (validate)" if b.pinned else "always active"
            parts.append(f"'{b.name}' is {what}")
            reason = "pinned"
        elif b.state is S.ACTIVE and b.name in leaving:
            parts.append(f"'{b.name}' is being switched out")
            reason = "switching_out"
        elif b.state is S.ACTIVE:
            left = quantum.get(b.name)
            if left is None:
                parts.append(f"'{b.name}' holds the GPU")
            elif math.isinf(left):
                parts.append(f"'{b.name}' holds the GPU (the policy does not switch yet)")
            else:
                parts.append(f"'{b.name}' serves its quantum ({left:.1f}s left)")
            reason = "quantum" if reason == "queued" else reason
    if not parts:
        ahead = [w.name for w in waiting if w.name != t.name
                 and (w.oldest_wait or now) <= (t.oldest_wait or now)]
        if ahead:
            return f"queued behind '{ahead[0]}', which waits for the same GPUs", "queued"
        return "waiting for the next scheduling pass", "queued"
    return "; ".join(parts), reason
