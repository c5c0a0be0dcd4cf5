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
from llmuxd.policy.explain import Explained
from llmuxd.states import ModelState

log = structlog.get_logger("llmuxd.supervisor")
S = ModelState

GPU_SAMPLE = 2.0           # GPU memory per model for status and metrics


def scheduling(m: ModelRuntime, gate: GateView | None, sched: Explained | None,
               now: float) -> dict[str, Any]:
    """The scheduler's view of one model: waiting, quantum left, idle time, why it waits."""
    queued = (gate.queued if gate else 0) + len(m.demands)
    in_flight = gate.in_flight if gate else 0
    waits = [t for t in (gate.oldest_wait if gate else None,
                         m.demand_since if m.demands else None) if t is not None]
    idle = None
    if m.state is S.ACTIVE and not in_flight and not queued:
        idle = now - max(gate.last_use if gate else 0.0, m.active_since or 0.0)
    quantum = sched.quantum_left_s if sched is not None else None
    return {
        "waiting": queued,
        "oldest_wait_s": round(now - min(waits), 3) if waits else None,
        "quantum_left_s": None if quantum is None else (
            round(quantum, 3) if quantum != float("inf") else -1),
        "idle_s": None if idle is None else round(max(0.0, idle), 3),
        "why_waiting": sched.why if sched is not None and queued else None,
        "waiting_reason": sched.reason if sched is not None and queued else None,
        "expected_switch_in_s": _round(m.expected_in_secs()),
        "expected_switch_out_s": _round(m.expected_out_secs()),
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def model_status(m: ModelRuntime, gate: GateView | None,
                 sched: Explained | None = None) -> dict[str, Any]:
    """One model's ``ModelStatus`` (``scheduling``: the planner's last explanation)."""
    mc = m.config
    # A starting child has a pid before it is healthy (the start operation holds it).
    child = m.child if m.child is not None else (m.op.child if m.op is not None else None)
    return {
        "name": m.name, "state": str(m.state),
        "sleep_level": m.sleep_level if m.state is S.SLEEPING else None,
        "configured_sleep_level": mc.sleep_level,
        "pid": child.pid if child is not None else None,
        "port": mc.port if mc.transport == "tcp" else None, "upstream": mc.upstream,
        "in_flight": gate.in_flight if gate else 0,
        "queued": (gate.queued if gate else 0) + len(m.demands),
        "gpus": list(mc.gpu_indices),
        "gpu_memory_mib": {str(k): v for k, v in sorted(m.gpu_memory_mib.items())},
        "gpu_memory_utilization": mc.gpu_memory_utilization,
        "state_since": m.state_since, "aliases": list(mc.aliases),
        "restarts": m.restarts, "last_error": m.last_error,
        "last_switch": m.last_switch.to_dict() if m.last_switch else None,
        "failures": m.failures, "operation": m.op.kind if m.op else None,
        "scheduling": scheduling(m, gate, sched, time.monotonic()),
        **upkeep_status(m),
    }


def upkeep_status(m: ModelRuntime) -> dict[str, Any]:
    """Keep-active, idle TTL, prewarm progress and host RAM of one model (its idle
    time is ``scheduling.idle_s``)."""
    mc = m.config
    return {
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
    scheduler: dict[str, Any] | None = None   # policy, options, learned switch costs


def daemon_status(facts: DaemonFacts, models: Mapping[str, ModelRuntime],
                  gates: Mapping[str, GateView], gpus: list[dict[str, Any]],
                  explained: Mapping[str, Explained] | None = None) -> dict[str, Any]:
    """The whole ``/v1/status`` document: the daemon, the GPUs, every model."""
    explained = explained or {}
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
        "scheduler": facts.scheduler,
        "models": {n: model_status(m, gates.get(n), explained.get(n))
                   for n, m in models.items() if not m.removed},
    }


def scheduler_facts(policy: str, options: Mapping[str, Any],
                    costs: Mapping[tuple[str | None, str], float]) -> dict[str, Any]:
    """``/v1/status`` ``scheduler``: the policy, its options, the learned switch costs."""
    return {
        "policy": policy, "options": dict(options),
        "switch_costs": [{"from": k[0], "to": k[1], "secs": round(v, 3)}
                         for k, v in sorted(costs.items(), key=lambda kv: (kv[0][0] or "",
                                                                           kv[0][1]))],
    }


def active_line(shutting_down: bool, models: Mapping[str, ModelRuntime]) -> str:
    """systemd's STATUS= line: which models are active (or that the daemon is stopping)."""
    if shutting_down:
        return "stopping"
    active = [m.name for m in models.values() if m.state is S.ACTIVE]
    return "active: " + (", ".join(sorted(active)) if active else "none")


def update_gauges(models: Mapping[str, ModelRuntime], gates: Mapping[str, GateView],
                  metrics: Metrics, explained: Mapping[str, Explained] | None = None,
                  policy: str | None = None,
                  costs: Mapping[tuple[str | None, str], float] | None = None) -> None:
    """Per-model state, in-flight, queue and scheduling gauges for /metrics."""
    explained = explained or {}
    now = time.monotonic()
    for name, m in models.items():
        gate = gates.get(name)
        metrics.model_gauges(name, str(m.state), gate.in_flight if gate else 0,
                             gate.queued if gate else 0)
        if m.removed:
            continue
        s = scheduling(m, gate, explained.get(name), now)
        metrics.scheduling(name, s["quantum_left_s"], s["oldest_wait_s"], s["idle_s"],
                           s["waiting_reason"])
    if policy is not None:
        metrics.scheduler(policy, dict(costs or {}))


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
                    self.metrics.model_gpu_memory(name, sum(m.gpu_memory_mib.values()))
                for g in gpus:
                    self.metrics.gpu_memory(g["index"], g["used_mib"])
            self.post(apply)

        threading.Thread(target=work, name="gpu-sample", daemon=True).start()
