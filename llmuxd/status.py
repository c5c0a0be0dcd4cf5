"""What the daemon reports about itself: status documents, the systemd line, GPU samples.

All of it reads the model table and lease gates it is handed, on the loop thread
(the control API asks through the mailbox's ``query``), so a status is one
consistent picture; it knows nothing of the supervisor. The shapes are the
control API's ``ModelStatus`` and ``/v1/status`` (docs/interfaces.md §5).

GPU memory per model is sampled every ``GPU_SAMPLE`` seconds in a thread of its
own (NVML reads may be slow) and applied back on the loop thread, so a status
request never waits on the GPU.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from llmuxd import __version__ as VERSION
from llmuxd.leases import GateView
from llmuxd.metrics import Metrics
from llmuxd.model import ModelRuntime
from llmuxd.states import ModelState

log = structlog.get_logger("llmuxd.supervisor")
S = ModelState

GPU_SAMPLE = 2.0           # GPU memory per model for status and metrics


def model_status(m: ModelRuntime, gate: GateView | None) -> dict[str, Any]:
    """One model's ``ModelStatus``."""
    mc = m.config
    return {
        "name": m.name, "state": str(m.state),
        "sleep_level": m.sleep_level if m.state is S.SLEEPING else None,
        "configured_sleep_level": mc.sleep_level,
        "pid": m.child.pid if m.child is not None else None,
        "port": mc.port, "upstream": f"http://127.0.0.1:{mc.port}",
        "in_flight": gate.in_flight if gate else 0,
        "queued": (gate.queued if gate else 0) + len(m.demands),
        "gpus": list(mc.gpu_indices),
        "gpu_memory_mib": {str(k): v for k, v in sorted(m.gpu_memory_mib.items())},
        "gpu_memory_utilization": mc.gpu_memory_utilization,
        "state_since": m.state_since, "aliases": list(mc.aliases),
        "restarts": m.restarts, "last_error": m.last_error,
        "last_switch": m.last_switch.to_dict() if m.last_switch else None,
        "failures": m.failures, "operation": m.op.kind if m.op else None,
        **upkeep_status(m),
    }


def upkeep_status(m: ModelRuntime) -> dict[str, Any]:
    """Idle time, keep-active, prewarm progress and host RAM of one model."""
    mc = m.config
    return {
        "idle_s": (round(time.monotonic() - m.idle_since, 3)
                   if m.idle_since is not None else None),
        "idle_sleep_secs": mc.idle_sleep_secs or None, "keep_active": mc.keep_active,
        "prewarm": m.prewarm, "host_memory_bytes": m.host_memory_bytes,
        "l1_host_bytes": m.l1_host[1] if m.l1_host else None,
    }


@dataclass(frozen=True)
class DaemonFacts:
    """The daemon-wide part of ``/v1/status``, gathered by the supervisor."""

    started_at: float
    config_path: str
    socket: str
    ready: bool
    shutting_down: bool
    policy: str
    frontend_pid: int | None
    probe: str | None


def daemon_status(facts: DaemonFacts, models: Mapping[str, ModelRuntime],
                  gates: Mapping[str, GateView], gpus: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole ``/v1/status`` document: the daemon, the GPUs, every model."""
    return {
        "daemon": {
            "pid": os.getpid(), "version": VERSION, "started_at": facts.started_at,
            "uptime_s": round(time.time() - facts.started_at, 3),
            "config": facts.config_path, "socket": facts.socket,
            "ready": facts.ready, "shutting_down": facts.shutting_down,
            "policy": facts.policy,
            "frontend_pid": facts.frontend_pid,
            "probe": facts.probe,
            "active": sorted(m.name for m in models.values() if m.state is S.ACTIVE),
        },
        "gpus": list(gpus),
        "models": {n: model_status(m, gates.get(n)) for n, m in models.items()
                   if not m.removed},
    }


def active_line(shutting_down: bool, models: Mapping[str, ModelRuntime]) -> str:
    """systemd's STATUS= line: which models are active (or that the daemon is stopping)."""
    if shutting_down:
        return "stopping"
    active = [m.name for m in models.values() if m.state is S.ACTIVE]
    return "active: " + (", ".join(sorted(active)) if active else "none")


def update_gauges(models: Mapping[str, ModelRuntime], gates: Mapping[str, GateView],
                  metrics: Metrics) -> None:
    """Per-model state, in-flight and queue gauges for /metrics."""
    for name, m in models.items():
        gate = gates.get(name)
        metrics.model_gauges(name, str(m.state), gate.in_flight if gate else 0,
                             gate.queued if gate else 0)


class GpuSampler:
    """The latest GPU list and per-model memory, refreshed by a thread now and then."""

    def __init__(self, post: Callable[[Callable[[], None]], None], metrics: Metrics) -> None:
        self.post = post
        self.metrics = metrics
        self.gpus: list[dict[str, Any]] = []
        self.next_at = 0.0
        self.running = False

    def maybe_sample(self, probe: Any, models: dict[str, ModelRuntime], now: float) -> None:
        """Start a sample when one is due and none is running (loop thread)."""
        if now >= self.next_at and not self.running:
            self.next_at = now + GPU_SAMPLE
            self.sample(probe, models)

    def soon(self) -> None:
        """Sample at the next tick: a model's memory just changed (active, asleep, gone)."""
        self.next_at = 0.0

    def sample(self, probe: Any, models: dict[str, ModelRuntime]) -> None:
        """Read the GPUs and each child's memory in a thread; apply it on the loop thread."""
        if probe is None:
            return
        children = {m.name: m.child for m in models.values() if m.child is not None}
        self.running = True

        def work() -> None:
            from llmuxd.gpu.memory import child_usage
            gpus: list[dict[str, Any]] = []
            usage: dict[str, dict[int, int]] = {}
            try:
                gpus = [{"index": g.index, "name": g.name, "total_mib": g.total_mib,
                         "used_mib": g.used_mib} for g in probe.gpus()]
                for name, child in children.items():
                    u = child_usage(probe, child.group_pids())
                    if u is not None:
                        usage[name] = u
            except Exception as exc:
                log.warning("gpu_sample_failed", error=repr(exc))

            def apply() -> None:
                self.running = False
                self.gpus = gpus
                for name, m in models.items():
                    m.gpu_memory_mib = usage.get(name, {}) if m.child is not None else {}
                for g in gpus:
                    self.metrics.gpu_memory(g["index"], g["used_mib"])
            self.post(apply)

        threading.Thread(target=work, name="gpu-sample", daemon=True).start()
