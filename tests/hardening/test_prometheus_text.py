"""Prometheus text: the simulator writes it with prometheus_client, llmuxd parses it
with prometheus_client's parser; both ends survive any label value."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmuxd.vllm_client import VllmError, parse_prometheus, sleep_operation_seconds
from vllmsim.metrics import SimMetrics

ODD = ['we"ird', "back\\slash", "new\nline", "cr\rhere", "sep\u2028line", "café 🦙",
       "a}b", 'x",y="z']


def _render(name: str) -> str:
    m = SimMetrics(name)
    m.op_started("sleep")
    m.op_finished("sleep", 1.5)
    m.success["stop"] = 2
    m.ttft.observe(0.02)
    return m.render(running=1, waiting=2, sleep_state={"awake": 1, "weights_offloaded": 0},
                    kv_usage=0.25)


def test_simulator_escapes_label_values():
    for name in ODD:
        families = list(text_string_to_metric_families(_render(name)))
        names = {s.labels.get("model_name") for f in families for s in f.samples} - {None}
        assert names == {name}


def test_simulator_keeps_vllm_metric_names_and_sleep_histogram():
    samples = parse_prometheus(_render("m"))
    by = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}
    assert by[("vllm:num_requests_waiting", (("engine", "0"), ("model_name", "m")))] == 2.0
    assert by[("vllm:request_success_total",
               (("engine", "0"), ("finished_reason", "stop"), ("model_name", "m")))] == 2.0
    assert sleep_operation_seconds(samples, "sleep") == 1.5
    assert by[("vllm:engine_sleep_state", (("engine", "0"), ("model_name", "m"),
                                           ("sleep_state", "awake")))] == 1.0


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=40), st.floats(allow_nan=False))
def test_any_label_value_and_number_round_trip(value, number):
    r = CollectorRegistry()
    Gauge("vllm:x", "help", ["a", "b"], registry=r).labels(value, "z").set(number)
    found = [s for s in parse_prometheus(generate_latest(r).decode()) if s.name == "vllm:x"]
    assert [(s.labels, s.value) for s in found] == [({"a": value, "b": "z"}, number)]


def test_malformed_text_is_a_vllm_error_not_a_crash():
    import pytest

    with pytest.raises(VllmError):
        parse_prometheus('vllm:x{a="unterminated} 1\n')
