"""GPU probe backend that reads the simulator's shared GPU directory.

`llmux-sim-vllm` processes record their (simulated) memory in a directory
(docs/interfaces.md section 3); this probe reads it the way the NVML backend reads
real GPUs, so the daemon's verify-after-sleep logic runs unchanged against the
simulator, including vllm#32714 (a sleep that frees nothing).
"""

from __future__ import annotations

import os

from llmuxd.gpu.base import GpuInfo
from vllmsim.gpustate import GpuState


class SimGpuProbe:
    """`GpuProbe` over a simulated-GPU state directory."""

    name = "sim"

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state = GpuState(state_dir)

    def gpus(self) -> list[GpuInfo]:
        """Every simulated GPU; [] when the directory is not initialised yet."""
        return [
            GpuInfo(index=s.index, name=s.name, total_mib=s.total_mib, used_mib=s.used_mib)
            for s in self.state.snapshot()
        ]

    def usage_by_pid(self) -> dict[int, dict[int, int]] | None:
        """pid -> {gpu index -> MiB} for every live simulated engine."""
        return self.state.usage_by_pid()
