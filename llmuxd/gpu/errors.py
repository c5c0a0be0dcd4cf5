"""Errors shared by the GPU probe backends."""

from __future__ import annotations


class ProbeUnavailable(RuntimeError):
    """The requested GPU probe cannot work on this machine; the message says why."""
