"""Scheduling policies (pure): ``make_policy(name)`` picks one by ``policy_type``."""

from __future__ import annotations

from llmuxd.policy.base import Policy
from llmuxd.policy.fifo import FifoPolicy

POLICY_TYPES = ("fifo",)


def make_policy(name: str) -> Policy:
    if name == "fifo":
        return FifoPolicy()
    raise ValueError(f"unknown policy_type {name!r}")
