"""Choosing the GPU probe from the config (``daemon.gpu_probe``).

``auto`` prefers real GPUs (NVML with at least one GPU), then the simulator's
state when one is configured, then none; an explicit choice that cannot work is
an error, so a deployment never silently runs unverified.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from llmuxd.config import Config
from llmuxd.gpu.base import GpuProbe
from llmuxd.gpu.errors import ProbeUnavailable
from llmuxd.gpu.none import NoGpuProbe
from llmuxd.gpu.nvml import NvmlGpuProbe

__all__ = ["ProbeUnavailable", "make_probe", "make_probe_explained", "sim_state_dir"]


def sim_state_dir(config: Config, env: Mapping[str, str] | None = None) -> str:
    """The simulated GPU state directory: config first, then env LLMUX_SIM_GPU_STATE."""
    env = os.environ if env is None else env
    return config.daemon.sim_gpu_state or env.get("LLMUX_SIM_GPU_STATE", "")


def make_probe(config: Config, env: Mapping[str, str] | None = None) -> GpuProbe:
    """The probe the config asks for; raises ProbeUnavailable with the reason."""
    return make_probe_explained(config, env)[0]


def make_probe_explained(config: Config, env: Mapping[str, str] | None = None
                         ) -> tuple[GpuProbe, str]:
    """The probe and one line saying why it was chosen (for the daemon's start log)."""
    kind = config.daemon.gpu_probe
    if kind == "none":
        return NoGpuProbe(), "gpu_probe = none"
    if kind == "nvml":
        return _nvml(), "gpu_probe = nvml"
    if kind == "sim":
        state = sim_state_dir(config, env)
        if not state:
            raise ProbeUnavailable("gpu_probe = sim needs daemon.sim_gpu_state or env "
                                   "LLMUX_SIM_GPU_STATE (the simulated GPU directory)")
        return _sim(state), f"gpu_probe = sim ({state})"
    if kind != "auto":
        raise ProbeUnavailable(f"unknown gpu_probe {kind!r}")
    try:
        probe = _nvml()
    except ProbeUnavailable as exc:
        why = str(exc)
    else:
        if probe.count > 0:
            return probe, f"auto: NVML sees {probe.count} GPU(s)"
        probe.close()
        why = "NVML sees no GPU"
    state = sim_state_dir(config, env)
    if state:
        return _sim(state), f"auto: {why}; using the simulated GPUs in {state}"
    return NoGpuProbe(), f"auto: {why}; no GPU memory checks"


def _nvml() -> NvmlGpuProbe:
    return NvmlGpuProbe()


def _sim(state: str) -> GpuProbe:
    try:
        from llmuxd.gpu.sim import SimGpuProbe  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise ProbeUnavailable(f"the simulated GPU probe is not available: {exc}") from exc
    probe: GpuProbe = SimGpuProbe(state)
    return probe
