"""Scheduling policies (pure): ``make_policy(name)`` picks one by ``policy_type``."""

from __future__ import annotations

from llmuxd.policy.adaptive import AdaptivePolicy
from llmuxd.policy.base import Policy
from llmuxd.policy.cost_aware import CostAwarePolicy
from llmuxd.policy.fifo import FifoPolicy
from llmuxd.policy.time_slice import TimeSlicePolicy

POLICIES: dict[str, type[Policy]] = {
    "fifo": FifoPolicy,
    "cost_aware": CostAwarePolicy,
    "time_slice": TimeSlicePolicy,
    "adaptive": AdaptivePolicy,
}
POLICY_TYPES = tuple(POLICIES)


def make_policy(name: str) -> Policy:
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy_type {name!r} (one of {', '.join(POLICY_TYPES)})")
    return cls()
