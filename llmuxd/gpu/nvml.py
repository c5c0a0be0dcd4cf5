"""The NVML probe (nvidia-ml-py): real GPU memory, per GPU and per process.

Why NVML and not nvidia-smi: one library call per reading, no subprocess, and
per-process usage, which lets the daemon attribute memory to one child's process
group. GPU indices are NVML's (PCI bus order); children get
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so CUDA_VISIBLE_DEVICES means the same GPUs.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from llmuxd.gpu.base import GpuInfo
from llmuxd.gpu.errors import ProbeUnavailable

__all__ = ["NvmlGpuProbe", "ProbeUnavailable"]

_MIB = 1024 * 1024
_init_lock = threading.Lock()


def _pynvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:  # the dependency is declared; a broken install lands here
        raise ProbeUnavailable(f"NVML is unavailable: cannot import pynvml ({exc})") from exc
    return pynvml


class NvmlGpuProbe:
    """Reads every GPU NVML sees; raises ProbeUnavailable when NVML cannot start."""

    name = "nvml"

    def __init__(self) -> None:
        self._nvml = _pynvml()
        with _init_lock:
            try:
                self._nvml.nvmlInit()
            except self._nvml.NVMLError as exc:
                raise ProbeUnavailable(
                    f"NVML is unavailable: {exc} (no NVIDIA driver on this machine?)"
                ) from None
            try:
                self._count = int(self._nvml.nvmlDeviceGetCount())
            except self._nvml.NVMLError as exc:
                raise ProbeUnavailable(f"NVML cannot count GPUs: {exc}") from None

    @property
    def count(self) -> int:
        return self._count

    def _handle(self, index: int) -> Any:
        return self._nvml.nvmlDeviceGetHandleByIndex(index)

    def gpus(self) -> list[GpuInfo]:
        result = []
        for index in range(self._count):
            handle = self._handle(index)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            name = self._nvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            result.append(GpuInfo(index=index, name=str(name), total_mib=int(mem.total) // _MIB,
                                  used_mib=int(mem.used) // _MIB))
        return result

    def usage_by_pid(self) -> dict[int, dict[int, int]] | None:
        """pid -> {gpu -> MiB}; None when NVML does not report per-process memory.

        NVML gives no per-process figure in some setups (e.g. without the rights
        to see other processes): then the daemon falls back to per-GPU totals.
        """
        usage: dict[int, dict[int, int]] = {}
        for index in range(self._count):
            try:
                procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle(index))
            except self._nvml.NVMLError:
                return None
            for proc in procs:
                used = getattr(proc, "usedGpuMemory", None)
                if used is None:
                    return None
                per_gpu = usage.setdefault(int(proc.pid), {})
                per_gpu[index] = per_gpu.get(index, 0) + int(used) // _MIB
        return usage

    def close(self) -> None:
        with _init_lock, contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()
