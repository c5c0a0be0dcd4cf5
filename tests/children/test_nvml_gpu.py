"""NVML on a real GPU: readings, per-process attribution, a child's group, freeing.

Skipped where NVML cannot start (no NVIDIA driver), as on the 2-core dev box; run
on a GPU machine. A process holding memory is made with libcuda through ctypes,
so no CUDA Python package is needed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from llmuxd.child import ChildProcess
from llmuxd.config import build_config
from llmuxd.gpu.errors import ProbeUnavailable
from llmuxd.gpu.memory import child_usage, fits, gpu_used
from llmuxd.gpu.select import make_probe_explained

from .conftest import Reaper, wait_until

try:
    from llmuxd.gpu.nvml import NvmlGpuProbe

    _PROBE: NvmlGpuProbe | None = NvmlGpuProbe()
    _WHY = ""
except ProbeUnavailable as exc:
    _PROBE, _WHY = None, str(exc)

pytestmark = pytest.mark.skipif(_PROBE is None or _PROBE.count == 0,
                                reason=f"needs an NVIDIA GPU ({_WHY or 'none seen'})")

# Holds argv[1] GiB on GPU 0 until killed.
ALLOC = r"""
import ctypes, sys, time
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0
dev = ctypes.c_int()
assert cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
ctx = ctypes.c_void_p()
assert cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev) == 0
ptr = ctypes.c_uint64()
size = int(float(sys.argv[1]) * (1 << 30))
assert cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(size)) == 0
print("ready", flush=True)
while True:
    time.sleep(1)
"""


@pytest.fixture
def probe() -> NvmlGpuProbe:
    assert _PROBE is not None
    return _PROBE


def test_nvml_reads_every_gpu_with_plausible_memory(probe: NvmlGpuProbe) -> None:
    gpus = probe.gpus()
    assert [g.index for g in gpus] == list(range(probe.count))
    assert all(g.total_mib > 1024 and 0 <= g.used_mib <= g.total_mib for g in gpus)


def test_auto_picks_nvml_when_a_gpu_is_there() -> None:
    config = build_config({"models": {"m": {"model_path": "p", "port": 8001}}})
    probe, why = make_probe_explained(config, env={})
    assert (probe.name, why) == ("nvml", f"auto: NVML sees {len(probe.gpus())} GPU(s)")


def test_memory_of_a_child_group_is_attributed_and_freed_by_stop(
        probe: NvmlGpuProbe, reaper: Reaper, tmp_path: Path) -> None:
    # The allocating process is a grandchild under a shell: attribution goes through
    # the process group, as with vLLM's EngineCore under the API server.
    script = tmp_path / "alloc.py"
    script.write_text(ALLOC)
    child = reaper.track(ChildProcess.spawn_command(
        ["sh", "-c", f"{sys.executable} {script} 2 & wait"], dict(os.environ), "alloc",
        tmp_path))
    wait_until(lambda: "ready" in child.tail(5), timeout=120, what="the allocation")
    group = child.group_pids()
    usage = child_usage(probe, group, (0,))
    assert usage is not None and usage[0] >= 2048, usage
    used_while_held = gpu_used(probe, [0])[0]
    ok, why = fits(probe, [0], 1.0)
    assert not ok and "GPU 0 has" in why
    assert child.stop(grace=10) == -15
    # NVML lets go of an exited process a moment after it is gone from /proc: poll.
    wait_until(lambda: not set(group) & set(probe.usage_by_pid() or {}),
               what="NVML to drop the group's pids")
    wait_until(lambda: gpu_used(probe, [0])[0] <= used_while_held - 2048,
               what="the GPU's used memory to drop by the allocation")
