"""The probe for machines without a GPU (CPU backends, CI): it sees nothing.

With this probe the daemon cannot verify that a sleep freed memory, so it trusts
vLLM's ``/is_sleeping`` alone; validate shows "n/a" for the memory columns.
"""

from __future__ import annotations

from llmuxd.gpu.base import GpuInfo


class NoGpuProbe:
    """No GPUs, no per-process attribution."""

    name = "none"

    def gpus(self) -> list[GpuInfo]:
        return []

    def usage_by_pid(self) -> dict[int, dict[int, int]] | None:
        return None
