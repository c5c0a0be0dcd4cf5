"""`--sim-real-cuda` / LLMUX_SIM_REAL_CUDA: off by default, torch never imported then.

The real mode itself runs on a GPU machine (tests/daemon/device_check_sleep.py); here a
stand-in torch (tests/sim/faketorch) on PYTHONPATH records every import, allocation
and release of the real simulator processes, so the wiring is checked on a CPU: what
the engine child allocates at start, frees on sleep, keeps under `sleep_no_free`, and
allocates again on wake.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llmux_testkit.sim import SimProcess, wait_for
from vllmsim.options import parse_serve

FAKE = str(Path(__file__).parent / "faketorch")
GIB = 1 << 30


def fake_env(tmp_path: Path, real: bool) -> tuple[dict[str, str], Path]:
    log = tmp_path / "torch.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMUX_SIM_")}
    env["PYTHONPATH"] = os.pathsep.join([FAKE, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["FAKE_TORCH_LOG"] = str(log)
    if real:
        env["LLMUX_SIM_REAL_CUDA"] = "1"
    return env, log


def events(log: Path) -> list[tuple[str, int]]:
    if not log.exists():
        return []
    return [(op, int(n)) for _pid, op, n in (ln.split() for ln in log.read_text().splitlines())]


def test_off_by_default_and_switched_on_by_flag_or_env() -> None:
    assert parse_serve(["m"], env={}).real_cuda is False
    assert parse_serve(["m"], env={"LLMUX_SIM_REAL_CUDA": "0"}).real_cuda is False
    assert parse_serve(["m"], env={"LLMUX_SIM_REAL_CUDA": "1"}).real_cuda is True
    assert parse_serve(["m", "--sim-real-cuda"], env={}).real_cuda is True


def test_simulator_modules_do_not_import_torch() -> None:
    code = ("import sys, vllmsim.cli, vllmsim.server, vllmsim.enginecore, "
            "vllmsim.realcuda; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_default_mode_never_imports_torch_even_when_importable(tmp_path: Path) -> None:
    env, log = fake_env(tmp_path, real=False)
    with SimProcess(env=env, log_path=tmp_path / "sim.log") as s:
        assert s.post("/sleep?level=1").status_code == 200
        assert s.post("/wake_up").status_code == 200
    assert events(log) == []


def test_real_mode_allocates_frees_on_sleep_and_reallocates_on_wake(tmp_path: Path) -> None:
    env, log = fake_env(tmp_path, real=True)
    with SimProcess(env=env, gpu_memory_utilization=0.5, log_path=tmp_path / "sim.log",
                    args=["--sim-size-gib", "4"]) as s:
        started = events(log)
        assert ("import", 0) in started
        allocs = [n for op, n in started if op == "alloc"]
        assert allocs[0] == 4 * GIB                            # weights, then KV cache
        assert sum(allocs) == 40 * GIB - 512 * (1 << 20)      # util x total - context
        assert s.post("/sleep?level=2").status_code == 200
        freed = [n for op, n in events(log)[len(started):] if op == "free"]
        assert sorted(freed) == sorted(allocs)
        before_wake = len(events(log))
        assert s.post("/wake_up").status_code == 200
        again = [n for op, n in events(log)[before_wake:] if op == "alloc"]
        assert sorted(again) == sorted(allocs)


def test_sleep_no_free_keeps_the_real_memory(tmp_path: Path) -> None:
    env, log = fake_env(tmp_path, real=True)
    with SimProcess(env=env, log_path=tmp_path / "sim.log") as s:
        n = len(events(log))
        assert any(op == "alloc" for op, _ in events(log))
        s.set_faults({"sleep_no_free": True})
        assert s.post("/sleep?level=1").status_code == 200
        assert s.get("/is_sleeping").json() == {"is_sleeping": True}
        assert [op for op, _ in events(log)[n:]] == []


def test_real_mode_start_fails_like_vllm_when_the_share_is_not_free(tmp_path: Path) -> None:
    env, _ = fake_env(tmp_path, real=True)
    env["FAKE_TORCH_FOREIGN_GIB"] = "60"  # 20 of 80 GiB free, 0.9 x 80 wanted
    s = SimProcess(env=env, log_path=tmp_path / "sim.log").start()
    try:
        assert s.wait_exit(60) == 1
    finally:
        s.stop()
    wait_for(lambda: "less than desired GPU memory utilization" in s.log(), 10, "the error")
