"""Prometheus text for the simulator's /metrics, with vLLM's metric names.

The state is kept in plain counters (cheap on the request path); ``render`` hands
it to prometheus_client as metric families, whose exposition escapes label values
(a model name with ``"``, ``\\`` or a newline once broke the page) exactly as
vLLM's own prometheus_client does. The sleep operation histogram mirrors vLLM
0.32's `vllm:sleep_mode_operation_duration_seconds` (label operation="sleep"|"wake",
its buckets): benchmarks subtract it from switch time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

SLEEP_BUCKETS = (0.01, 0.1, 1, 10, 30, 60, 120, 300, 600)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
LABELS = ("engine", "model_name")


@dataclass
class Histogram:
    """One labelled histogram series (cumulative bucket counts)."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0
    created: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.n += 1
        self.total += value
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        buckets = [(str(float(b)), float(c))
                   for b, c in zip(self.buckets, self.counts, strict=True)]
        buckets.append(("+Inf", float(self.n)))
        family.add_metric(labels, buckets, self.total)


class SimMetrics:
    """All counters the simulator exports."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.sleep_ops: dict[str, Histogram] = {}
        self.sleep_in_flight: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)

    def op_started(self, op: str) -> None:
        self.sleep_in_flight[op] = self.sleep_in_flight.get(op, 0) + 1

    def op_finished(self, op: str, seconds: float) -> None:
        self.sleep_in_flight[op] = self.sleep_in_flight.get(op, 1) - 1
        self.sleep_ops.setdefault(op, Histogram(SLEEP_BUCKETS)).observe(seconds)

    def render(self, *, running: int, waiting: int, sleep_state: dict[str, int],
               kv_usage: float) -> str:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(self, running, waiting, sleep_state, kv_usage))
        return generate_latest(registry).decode("utf-8")


class _Snapshot:
    """A one-shot collector: the families of one /metrics answer."""

    def __init__(self, m: SimMetrics, running: int, waiting: int,
                 sleep_state: dict[str, int], kv_usage: float) -> None:
        self.m, self.running, self.waiting = m, running, waiting
        self.sleep_state, self.kv_usage = sleep_state, kv_usage

    def collect(self) -> Iterator[Metric]:
        m = self.m
        lab = ["0", m.model_name]
        g = GaugeMetricFamily("vllm:num_requests_running",
                              "Number of requests in model execution batches.", labels=LABELS)
        g.add_metric(lab, float(self.running))
        yield g
        g = GaugeMetricFamily("vllm:num_requests_waiting",
                              "Number of requests waiting to be processed.", labels=LABELS)
        g.add_metric(lab, float(self.waiting))
        yield g
        g = GaugeMetricFamily(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine "
            "is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means "
            "sleep level 2.", labels=(*LABELS, "sleep_state"))
        for state, value in self.sleep_state.items():
            g.add_metric([*lab, state], float(value))
        yield g
        g = GaugeMetricFamily("vllm:kv_cache_usage_perc",
                              "KV-cache usage. 1 means 100 percent usage.", labels=LABELS)
        g.add_metric(lab, float(self.kv_usage))
        yield g
        c = CounterMetricFamily("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                labels=LABELS)
        c.add_metric(lab, float(m.prompt_tokens))
        yield c
        c = CounterMetricFamily("vllm:generation_tokens",
                                "Number of generation tokens processed.", labels=LABELS)
        c.add_metric(lab, float(m.generation_tokens))
        yield c
        c = CounterMetricFamily("vllm:request_success",
                                "Count of successfully processed requests.",
                                labels=(*LABELS, "finished_reason"))
        for reason, n in m.success.items():
            c.add_metric([*lab, reason], float(n))
        yield c
        h = HistogramMetricFamily("vllm:time_to_first_token_seconds",
                                  "Histogram of time to first token in seconds.", labels=LABELS)
        m.ttft.add_to(h, lab)
        yield h
        h = HistogramMetricFamily("vllm:e2e_request_latency_seconds",
                                  "Histogram of e2e request latency in seconds.", labels=LABELS)
        m.e2e.add_to(h, lab)
        yield h
        if m.sleep_ops:
            h = HistogramMetricFamily("vllm:sleep_mode_operation_duration_seconds",
                                      "Duration of one sleep-mode operation.",
                                      labels=("operation",))
            for op, hist in m.sleep_ops.items():
                hist.add_to(h, [op])
            yield h
            g = GaugeMetricFamily("vllm:sleep_mode_operations_in_flight",
                                  "Sleep-mode operations currently awaited.",
                                  labels=("operation",))
            for op, n in m.sleep_in_flight.items():
                g.add_metric([op], float(n))
            yield g
