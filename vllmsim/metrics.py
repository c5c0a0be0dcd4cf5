"""Prometheus text for the simulator's /metrics, with vLLM's metric names.

Hand-rendered (no registry) so each server is self-contained and cheap. The sleep
operation histogram mirrors vLLM 0.32's `vllm:sleep_mode_operation_duration_seconds`
(label operation="sleep"|"wake", its buckets): benchmarks subtract it from switch time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

SLEEP_BUCKETS = (0.01, 0.1, 1, 10, 30, 60, 120, 300, 600)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


@dataclass
class Histogram:
    """One labelled histogram series."""

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

    def render(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [
            f'{name}_bucket{{{labels}{sep}le="{float(b)}"}} {float(c)}'
            for b, c in zip(self.buckets, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {float(self.n)}')
        out.append(f"{name}_count{{{labels}}} {float(self.n)}")
        out.append(f"{name}_sum{{{labels}}} {self.total}")
        return out


class SimMetrics:
    """All counters the simulator exports."""

    def __init__(self, model_name: str) -> None:
        self.labels = f'engine="0",model_name="{model_name}"'
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
        lab = self.labels
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{lab}}} {float(running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{lab}}} {float(waiting)}",
            "# HELP vllm:engine_sleep_state Engine sleep state; awake = 0 means engine is "
            "sleeping; awake = 1 means engine is awake; weights_offloaded = 1 means sleep "
            "level 1; discard_all = 1 means sleep level 2.",
            "# TYPE vllm:engine_sleep_state gauge",
        ]
        for state, value in sleep_state.items():
            lines.append(f'vllm:engine_sleep_state{{{lab},sleep_state="{state}"}} {float(value)}')
        lines += [
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{lab}}} {kv_usage}",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{lab}}} {float(self.prompt_tokens)}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{lab}}} {float(self.generation_tokens)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
        ]
        for reason, n in self.success.items():
            lines.append(
                f'vllm:request_success_total{{{lab},finished_reason="{reason}"}} {float(n)}'
            )
        lines += [
            "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
            "# TYPE vllm:time_to_first_token_seconds histogram",
            *self.ttft.render("vllm:time_to_first_token_seconds", lab),
            "# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.",
            "# TYPE vllm:e2e_request_latency_seconds histogram",
            *self.e2e.render("vllm:e2e_request_latency_seconds", lab),
        ]
        if self.sleep_ops:
            lines += [
                "# HELP vllm:sleep_mode_operation_duration_seconds Duration of one "
                "sleep-mode operation.",
                "# TYPE vllm:sleep_mode_operation_duration_seconds histogram",
            ]
            for op, h in self.sleep_ops.items():
                lines += h.render("vllm:sleep_mode_operation_duration_seconds", f'operation="{op}"')
            lines += [
                "# HELP vllm:sleep_mode_operations_in_flight Sleep-mode operations currently "
                "awaited.",
                "# TYPE vllm:sleep_mode_operations_in_flight gauge",
            ]
            for op, n in self.sleep_in_flight.items():
                lines.append(f'vllm:sleep_mode_operations_in_flight{{operation="{op}"}} {float(n)}')
        return "\n".join(lines) + "\n"
