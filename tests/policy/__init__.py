"""Scheduling policies and the policy simulator (pure, no processes)."""
