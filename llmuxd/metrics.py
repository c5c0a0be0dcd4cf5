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
