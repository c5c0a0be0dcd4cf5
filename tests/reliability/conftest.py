"""Fixtures for the reliability suite: the daemon suite's ``make_daemon`` (real llmuxd)."""

from __future__ import annotations

from tests.daemon.conftest import make_daemon

__all__ = ["make_daemon"]
