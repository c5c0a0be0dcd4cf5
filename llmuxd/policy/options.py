"""Tuning knobs of the policies (one frozen record, the same for every policy).

The names and defaults of the first five are the Rust llmux 0.9 ones, so a config
written for it keeps its meaning; the rest belong to ``adaptive``. A policy reads
only the knobs it documents; the others are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyOptions:
    """Policy options; seconds unless the name says ms."""

    max_wait_secs: float = 15.0          # cost_aware, time_slice, adaptive: staleness bound
    amortization_factor: float = 0.5     # cost_aware: switch when queue >= factor x cost_s
    coalesce_window_ms: float = 2000.0   # cost_aware: otherwise defer this long
    tick_interval_ms: float = 500.0      # time_slice: how often the idle check runs
    min_quantum_ms: float = 2000.0       # adaptive: shortest visit of a busy model (unused
    #                                      by time_slice, as in the original)
    default_switch_secs: float = 10.0    # cost of a direction never measured (original: 10 s)
    linger_factor: float = 6.0           # adaptive: an idle active model is kept this x switch
    #                                      cost / (target's waiters)^2 before it leaves

    def errors(self) -> list[str]:
        """What is wrong with these values (empty when usable)."""
        out = []
        for name in ("max_wait_secs", "amortization_factor", "coalesce_window_ms",
                     "tick_interval_ms", "min_quantum_ms", "default_switch_secs",
                     "linger_factor"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or v < 0:
                out.append(f"policy.{name} must be a number >= 0, got {v!r}")
        if self.tick_interval_ms <= 0:
            out.append("policy.tick_interval_ms must be > 0")
        return out
