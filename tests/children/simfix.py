"""Starting ``llmux-sim-vllm`` children for these tests, through ChildProcess itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from llmux_testkit.sim import free_port
from llmuxd.child import ChildProcess
from llmuxd.config import Config, ModelConfig, build_config
from llmuxd.vllm_client import VllmClient

SIM = str(Path(sys.executable).with_name("llmux-sim-vllm"))
TIME_SCALE = "0.01"
GPU_MIB = 81920


def init_gpus(state: Path, count: int = 1) -> Path:
    subprocess.run([SIM, "gpus", "init", str(state), "--count", str(count),
                    "--total-mib", str(GPU_MIB)], check=True, capture_output=True, timeout=60)
    return state


def sim_config(tmp_path: Path, faults: tuple[str, ...] = (), name: str = "qwen",
               sleep_level: int = 1, extra: tuple[str, ...] = (),
               **daemon: object) -> Config:
    """A config whose one model runs on the simulator, fast, with these faults."""
    state = tmp_path / "gpus"
    if not (state / "gpus.json").exists():
        init_gpus(state)
    args = ["--sim-time-scale", TIME_SCALE]
    for fault in faults:
        args += ["--sim-fault", fault]
    args += list(extra)
    raw = {
        "vllm_command": SIM,
        "daemon": {"sim_gpu_state": str(state), "log_dir": str(tmp_path / "logs"),
                   "gpu_probe": "sim", "startup_timeout_secs": 60.0,
                   "sleep_timeout_secs": 30.0, "wake_timeout_secs": 30.0,
                   "stop_timeout_secs": 10.0, **daemon},
        "models": {name: {"model_path": "Qwen/Qwen3-8B", "port": free_port(), "transport": "tcp",
                          "sleep_level": sleep_level, "extra_args": args}},
    }
    return build_config(raw)


def start_sim(config: Config, model: ModelConfig) -> tuple[ChildProcess, VllmClient]:
    """Spawn the simulator for ``model`` and wait until /health answers."""
    child = ChildProcess.spawn(config, model, Path(config.daemon.log_dir),
                               base_env=dict(os.environ))
    client = VllmClient(model.port, model.name)
    try:
        client.wait_healthy(time.monotonic() + 60, child.is_alive, interval=0.05)
    except Exception:
        child.kill()
        raise
    return child, client
