"""Prometheus metrics on ``metrics_port``, named like the original tool where it had them.

A registry of our own (not the global one) so tests and several daemons in one
process never collide, and so the served page holds only llmux's series.
"""

from __future__ import annotations

from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmuxd.metrics_server import METRICS_MAX_CONNECTIONS, serve_metrics
from llmuxd.states import ModelState

__all__ = ["METRICS_MAX_CONNECTIONS", "Metrics"]

log = structlog.get_logger("llmuxd.metrics")

SWITCH_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STATE_VALUES = {s.value: i for i, s in enumerate(ModelState)}


class Metrics:
    """Every metric llmuxd exports, with small methods the supervisor calls."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.switch_total = Counter("llmux_switch_total", "Model switches",
                                    ["from", "to", "result"], registry=r)
        self.switch_seconds = Histogram("llmux_switch_duration_seconds",
                                        "Whole switch duration", ["from", "to"],
                                        buckets=SWITCH_BUCKETS, registry=r)
        self.phase_seconds = Histogram("llmux_switch_phase_seconds",
                                       "Switch phase durations (drain, sleep, verify, "
                                       "wake, warmup, start)", ["phase"],
                                       buckets=SWITCH_BUCKETS, registry=r)
        self.model_state = Gauge("llmux_model_state", "1 for the model's current state",
                                 ["model", "state"], registry=r)
        self.in_flight = Gauge("llmux_model_in_flight", "Leases held", ["model"], registry=r)
        self.queue_depth = Gauge("llmux_request_queue_depth", "Requests waiting for a lease",
                                 ["model"], registry=r)
        self.queue_wait = Histogram("llmux_request_queue_wait_seconds",
                                    "Time from lease request to grant", ["model"],
                                    buckets=REQUEST_BUCKETS, registry=r)
        self.requests = Counter("llmux_requests_total", "Requests by outcome",
                                ["model", "status"], registry=r)
        self.request_seconds = Histogram("llmux_request_duration_seconds",
                                         "Upstream request duration", ["model"],
                                         buckets=REQUEST_BUCKETS, registry=r)
        self.lease_refusals = Counter("llmux_lease_refusals_total", "Leases refused",
                                      ["model", "code"], registry=r)
        # A sleep that failed, or that vLLM acknowledged without freeing GPU memory
        # (caught by the verification step); either way the model was stopped.
        self.sleep_failures = Counter("llmux_sleep_failures_total",
                                      "Sleeps that failed or freed no GPU memory (model "
                                      "stopped instead)", ["model"], registry=r)
        self.model_gpu = Gauge("llmux_model_gpu_memory_mib",
                               "GPU memory held by the model's processes", ["model"],
                               registry=r)
        self.gpu_used = Gauge("llmux_gpu_memory_used_mib", "GPU memory used", ["gpu"],
                              registry=r)
        self.child_hangs = Counter("llmux_child_hangs_total", "Children the health "
                                   "watchdog found hung (and killed)", ["model"], registry=r)
        # Scheduling (issue 10): what llmuxctl status shows, as series.
        self.policy_info = Gauge("llmux_policy_info", "1 for the scheduling policy in use",
                                 ["policy"], registry=r)
        self.quantum_left = Gauge("llmux_model_quantum_left_seconds",
                                  "Time before an active model that others wait behind may "
                                  "be switched out (-1: not yet known; absent: nobody waits)",
                                  ["model"], registry=r)
        self.oldest_wait = Gauge("llmux_model_oldest_wait_seconds",
                                 "Age of the oldest request waiting for the model (0: none)",
                                 ["model"], registry=r)
        self.idle_seconds = Gauge("llmux_model_idle_seconds",
                                  "Time an active model has had nothing in flight or queued "
                                  "(0: busy or not active)", ["model"], registry=r)
        self.waiting_reason = Gauge("llmux_model_waiting_reason",
                                    "1 for why requests for the model wait (quantum, draining, "
                                    "switching_out, switching_in, pinned, queued, backoff, "
                                    "failed, leaving)", ["model", "reason"], registry=r)
        self.switch_cost = Gauge("llmux_switch_cost_ema_seconds",
                                 "Learned GPU time of a switch (EMA, alpha 0.3; drain excluded)",
                                 ["from", "to"], registry=r)
        self._policy: str | None = None
        self._reasons: dict[str, str] = {}
        self._quantum_set: set[str] = set()
        self._server: Any = None
        # Label lookups cost a lock and a tuple per call: cache the hot-path children.
        self._wait_children: dict[str, Any] = {}
        self._request_children: dict[tuple[str, str], Any] = {}
        self._duration_children: dict[str, Any] = {}

    def serve(self, port: int, probe: Any = None, host: str = "127.0.0.1",
              read_timeout: float = 10.0) -> None:
        """Serve /metrics on ``host:port`` (port 0: not served); failures are logged."""
        if not port:
            return
        try:
            self._server = serve_metrics(host, port, self.registry, read_timeout)
        except OSError as exc:
            log.error("metrics_listen_failed", host=host, port=port, error=str(exc))

    def switch(self, from_: str, to: str, result: str, seconds: float,
               phases_ms: dict[str, float]) -> None:
        self.switch_total.labels(from_, to, result).inc()
        if result == "ok":
            self.switch_seconds.labels(from_, to).observe(seconds)
        for phase, ms in phases_ms.items():
            self.phase_seconds.labels(phase).observe(ms / 1000)

    def model_gauges(self, model: str, state: str, in_flight: int, queued: int) -> None:
        for s in STATE_VALUES:
            self.model_state.labels(model, s).set(1 if s == state else 0)
        self.in_flight.labels(model).set(in_flight)
        self.queue_depth.labels(model).set(queued)

    def granted(self, model: str, waited_s: float) -> None:
        child = self._wait_children.get(model)
        if child is None:
            child = self._wait_children[model] = self.queue_wait.labels(model)
        child.observe(waited_s)

    def refused(self, model: str, code: str) -> None:
        self.lease_refusals.labels(model, code).inc()

    def released(self, model: str, status: Any, duration_ms: Any) -> None:
        key = (model, str(status if status is not None else "error"))
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.requests.labels(*key)
        counter.inc()
        if isinstance(duration_ms, int | float) and not isinstance(duration_ms, bool):
            hist = self._duration_children.get(model)
            if hist is None:
                hist = self._duration_children[model] = self.request_seconds.labels(model)
            hist.observe(float(duration_ms) / 1000)

    def sleep_failed(self, model: str) -> None:
        self.sleep_failures.labels(model).inc()

    def model_gpu_memory(self, model: str, used_mib: int) -> None:
        self.model_gpu.labels(model).set(used_mib)

    def child_hung(self, model: str) -> None:
        self.child_hangs.labels(model).inc()

    def gpu_memory(self, index: int, used_mib: int) -> None:
        self.gpu_used.labels(str(index)).set(used_mib)

    def scheduling(self, model: str, quantum_left: float | None, oldest_wait: float | None,
                   idle: float | None, reason: str | None) -> None:
        """One model's scheduling gauges (a series per reason, 1 for the current one)."""
        if quantum_left is None:
            if model in self._quantum_set:
                self._quantum_set.discard(model)
                self.quantum_left.remove(model)
        else:
            self._quantum_set.add(model)
            self.quantum_left.labels(model).set(quantum_left)
        self.oldest_wait.labels(model).set(oldest_wait or 0.0)
        self.idle_seconds.labels(model).set(idle or 0.0)
        old = self._reasons.get(model)
        if old is not None and old != reason:
            self.waiting_reason.labels(model, old).set(0)
        if reason is not None:
            self.waiting_reason.labels(model, reason).set(1)
            self._reasons[model] = reason
        else:
            self._reasons.pop(model, None)

    def scheduler(self, policy: str, costs: dict[tuple[str | None, str], float]) -> None:
        """The policy in use and the learned switch costs."""
        if policy != self._policy:
            if self._policy is not None:
                self.policy_info.labels(self._policy).set(0)
            self.policy_info.labels(policy).set(1)
            self._policy = policy
        for (src, dst), secs in costs.items():
            self.switch_cost.labels(src or "", dst).set(secs)
