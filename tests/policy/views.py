"""Hand-built policy snapshots for the edge tests."""

from __future__ import annotations

from typing import Any

from llmuxd.policy import make_policy
from llmuxd.policy.base import Decisions, ModelView, PolicyInput
from llmuxd.policy.options import PolicyOptions
from llmuxd.states import ModelState as S


def view(name: str, state: S = S.STOPPED, **kw: Any) -> ModelView:
    base: dict[str, Any] = dict(name=name, state=state, busy=False, in_flight=0, queued=0,
                                oldest_wait=None, active_since=None, gpus=(0,),
                                fraction=0.9, sleep_level=1)
    if state is S.ACTIVE:
        base["active_since"] = 0.0
    base.update(kw)
    return ModelView(**base)


def decide(policy: str, *views: ModelView, now: float = 100.0, drain: bool = True,
           min_active: float = 0.0, costs: dict[tuple[str | None, str], float] | None = None,
           **options: Any) -> Decisions:
    inp = PolicyInput(models={v.name: v for v in views}, now=now, drain_before_switch=drain,
                      min_active_secs=min_active, costs=costs or {},
                      options=PolicyOptions(**options))
    return make_policy(policy).decide(inp)
