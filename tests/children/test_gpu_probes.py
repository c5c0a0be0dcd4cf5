"""GPU probes: none, NVML (init failure on this GPU-less box), selection, memory helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmuxd.config import Config, build_config
from llmuxd.gpu.base import GpuInfo
from llmuxd.gpu.errors import ProbeUnavailable
from llmuxd.gpu.memory import child_usage, fits, gpu_used, sleep_problem, sleep_verified
from llmuxd.gpu.none import NoGpuProbe
from llmuxd.gpu.select import make_probe, make_probe_explained, sim_state_dir

from .simfix import init_gpus


def nvml_works() -> bool:
    try:
        from llmuxd.gpu.nvml import NvmlGpuProbe

        NvmlGpuProbe()
    except ProbeUnavailable:
        return False
    return True


needs_no_nvml = pytest.mark.skipif(nvml_works(), reason="this machine has a working NVML")


def config(**daemon: object) -> Config:
    return build_config({"models": {"m": {"model_path": "p", "port": 8001}},
                         "daemon": daemon})


@dataclass
class FixedProbe:
    """A probe with fixed readings (unit tests of the pure helpers)."""

    gpu_list: list[GpuInfo]
    by_pid: dict[int, dict[int, int]] | None = field(default_factory=dict)
    name: str = "fixed"

    def gpus(self) -> list[GpuInfo]:
        return self.gpu_list

    def usage_by_pid(self) -> dict[int, dict[int, int]] | None:
        return self.by_pid


TWO_GPUS = [GpuInfo(0, "A", 81920, 75000), GpuInfo(1, "B", 81920, 1000)]


def test_no_gpu_probe_sees_nothing_and_cannot_attribute() -> None:
    probe = NoGpuProbe()
    assert (probe.name, probe.gpus(), probe.usage_by_pid()) == ("none", [], None)


@needs_no_nvml
def test_nvml_init_failure_is_a_clear_probe_unavailable() -> None:
    from llmuxd.gpu.nvml import NvmlGpuProbe

    with pytest.raises(ProbeUnavailable, match="NVML is unavailable"):
        NvmlGpuProbe()


@needs_no_nvml
def test_auto_falls_back_to_none_without_nvml_or_sim_state() -> None:
    probe, why = make_probe_explained(config(), env={})
    assert probe.name == "none"
    assert "NVML is unavailable" in why and "no GPU memory checks" in why


@needs_no_nvml
def test_explicit_nvml_without_nvml_is_an_error_not_a_silent_fallback() -> None:
    with pytest.raises(ProbeUnavailable, match="NVML"):
        make_probe(config(gpu_probe="nvml"), env={})


def test_explicit_none_is_none() -> None:
    assert make_probe(config(gpu_probe="none"), env={}).name == "none"


def test_sim_without_a_state_dir_is_an_error_naming_both_settings() -> None:
    with pytest.raises(ProbeUnavailable, match=r"daemon\.sim_gpu_state or env LLMUX_SIM_GPU_STATE"):
        make_probe(config(gpu_probe="sim"), env={})


def test_sim_state_dir_prefers_the_config_over_the_env() -> None:
    assert sim_state_dir(config(sim_gpu_state="/a"), env={"LLMUX_SIM_GPU_STATE": "/b"}) == "/a"
    assert sim_state_dir(config(), env={"LLMUX_SIM_GPU_STATE": "/b"}) == "/b"


def test_child_usage_sums_the_group_pids_per_gpu_and_lists_its_gpus() -> None:
    probe = FixedProbe(TWO_GPUS, {10: {0: 500}, 11: {0: 70000, 1: 100}, 99: {0: 4000}})
    assert child_usage(probe, [10, 11, 12], gpu_indices=(0, 1, 2)) == {0: 70500, 1: 100, 2: 0}


def test_child_usage_is_none_when_the_probe_cannot_attribute() -> None:
    assert child_usage(FixedProbe(TWO_GPUS, None), [1]) is None


def test_gpu_used_reads_the_totals_of_the_listed_gpus() -> None:
    probe = FixedProbe(TWO_GPUS)
    assert gpu_used(probe, [1]) == {1: 1000}
    assert gpu_used(probe) == {0: 75000, 1: 1000}


def test_sleep_verified_allows_the_residue_and_no_more() -> None:
    assert sleep_verified({0: 2048, 1: 0}, 2048)
    assert not sleep_verified({0: 2048, 1: 2049}, 2048)
    assert sleep_verified({}, 2048)
    assert sleep_problem({0: 70000}, 2048) == (
        "sleep freed too little: GPU 0 still holds 70000 MiB (allowed residue 2048 MiB)")
    assert sleep_problem({0: 10}, 2048) == ""


def test_fits_names_the_gpu_and_the_mib_when_memory_is_short() -> None:
    probe = FixedProbe(TWO_GPUS)
    assert fits(probe, [1], 0.9) == (True, "fits")
    ok, why = fits(probe, [0, 1], 0.5)
    assert not ok
    assert why == "GPU 0 has 6920 MiB free, needs 40960 MiB (0.5 of 81920 MiB)"


def test_fits_rejects_a_gpu_the_probe_does_not_see() -> None:
    ok, why = fits(FixedProbe(TWO_GPUS), [3], 0.1)
    assert (ok, why) == (False, "GPU 3 does not exist (the probe sees GPUs 0, 1)")


def test_fits_without_gpu_readings_is_not_checked() -> None:
    ok, why = fits(NoGpuProbe(), [0], 0.9)
    assert ok and "not checked" in why


@needs_no_nvml
def test_auto_uses_the_simulated_gpus_when_a_state_dir_is_configured(tmp_path: Path) -> None:
    state = init_gpus(tmp_path / "gpus", count=2)
    probe, why = make_probe_explained(config(sim_gpu_state=str(state)), env={})
    assert probe.name == "sim"
    assert [g.index for g in probe.gpus()] == [0, 1]
    assert why.endswith(f"using the simulated GPUs in {state}")


def test_sim_probe_can_come_from_the_env_alone(tmp_path: Path) -> None:
    state = init_gpus(tmp_path / "gpus")
    probe = make_probe(config(gpu_probe="sim"), env={"LLMUX_SIM_GPU_STATE": str(state)})
    assert probe.name == "sim" and probe.usage_by_pid() == {}
