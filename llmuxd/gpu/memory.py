"""Pure helpers over a GPU probe: a child's memory, sleep verification, fit checks.

Why these exist: vLLM can answer a sleep with 200 and free nothing (vllm#32714),
and a start fails late and slowly when another process holds the memory. Both are
caught by reading the probe, the same way, in the supervisor and in validate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from llmuxd.gpu.base import GpuProbe


def child_usage(probe: GpuProbe, pids: Iterable[int],
                gpu_indices: Iterable[int] = ()) -> dict[int, int] | None:
    """GPU index → MiB held by these pids (a child's process group).

    None when the probe cannot attribute memory to processes (then compare
    per-GPU totals with :func:`gpu_used`). GPUs listed in ``gpu_indices`` appear
    with 0 when the child holds nothing there, so "freed" reads as 0, not absent.
    """
    by_pid = probe.usage_by_pid()
    if by_pid is None:
        return None
    usage = dict.fromkeys(gpu_indices, 0)
    for pid in set(pids):
        for index, mib in by_pid.get(pid, {}).items():
            usage[index] = usage.get(index, 0) + mib
    return usage


def gpu_used(probe: GpuProbe, gpu_indices: Iterable[int] | None = None) -> dict[int, int]:
    """GPU index → MiB used by everyone (all GPUs, or only those listed)."""
    wanted = None if gpu_indices is None else set(gpu_indices)
    return {g.index: g.used_mib for g in probe.gpus() if wanted is None or g.index in wanted}


def total_mib(usage: dict[int, int] | None) -> int | None:
    """Sum over GPUs (None stays None: "not measured")."""
    return None if usage is None else sum(usage.values())


def sleep_verified(usage_after: dict[int, int], residue_mib: int) -> bool:
    """True when every GPU keeps at most the CUDA-context residue after a sleep."""
    return all(mib <= residue_mib for mib in usage_after.values())


def sleep_problem(usage_after: dict[int, int], residue_mib: int) -> str:
    """Why a sleep is not verified ("" when it is): the GPUs and MiB still held."""
    held = [f"GPU {i} still holds {mib} MiB" for i, mib in sorted(usage_after.items())
            if mib > residue_mib]
    if not held:
        return ""
    return f"sleep freed too little: {', '.join(held)} (allowed residue {residue_mib} MiB)"


def needed_mib(total: int, utilization: float) -> int:
    """What vLLM asks for on a GPU: ``gpu_memory_utilization`` * total."""
    return math.ceil(total * utilization)


def fits(probe: GpuProbe, gpu_indices: Iterable[int], utilization: float) -> tuple[bool, str]:
    """Whether ``utilization`` * total is free now on each of these GPUs, and why not.

    vLLM refuses to start (late, after loading) when the free memory is below its
    share, so the daemon checks first. Without GPU readings there is nothing to
    check: (True, reason).
    """
    gpus = {g.index: g for g in probe.gpus()}
    if not gpus:
        return True, f"no GPU readings (probe {probe.name}): not checked"
    for index in gpu_indices:
        gpu = gpus.get(index)
        if gpu is None:
            known = ", ".join(str(i) for i in sorted(gpus))
            return False, f"GPU {index} does not exist (the probe sees GPUs {known})"
        need = needed_mib(gpu.total_mib, utilization)
        if gpu.free_mib < need:
            return False, (f"GPU {index} has {gpu.free_mib} MiB free, needs {need} MiB "
                           f"({utilization:g} of {gpu.total_mib} MiB)")
    return True, "fits"
