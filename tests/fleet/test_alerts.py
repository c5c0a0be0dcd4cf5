"""The Grafana dashboard and the Prometheus alert rules shipped in etc/fleet/.

* the rules pass ``promtool check rules`` and their unit tests (``promtool test rules``
  on tests/fleet/llmux-alerts.test.yml);
* every metric the dashboard's and the rules' queries name is one a running llmuxd
  exports on its /metrics (read from a real daemon, not from the registry's code),
  with a real sleep-verification failure and an active model behind the two
  series the alerts and the GPU panel need.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmux_testkit.daemon import DaemonProcess, free_port, sim_model

from .fleet_kit import metric_sum, needs, wait_until

TOP = Path(__file__).resolve().parents[2]
RULES = TOP / "etc/fleet/prometheus/llmux-alerts.yml"
RULE_TESTS = TOP / "tests/fleet/llmux-alerts.test.yml"
DASHBOARD = TOP / "etc/fleet/grafana/llmux-dashboard.json"
# Series Prometheus makes itself, not llmuxd.
PROMETHEUS_MADE = {"up"}
FAST = ["--sim-time-scale", "0.02"]

needs_promtool = needs("promtool", "prometheus")


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    r = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 5 rules found" in r.stdout + r.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass() -> None:
    r = subprocess.run(["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def dashboard_queries() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in data["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    for var in data["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def rule_queries() -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^\s+expr: (.+)$", RULES.read_text(),
                                                     re.M)]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: selectors and bare llmux_* names."""
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))
    names |= set(re.findall(r"\b(llmux_[a-zA-Z0-9_]+)\b", expr))
    return names


def exported_names(text: str) -> set[str]:
    """Every series name a /metrics page can carry (histograms: _bucket, _sum, _count)."""
    names: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            name, kind = m.groups()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            if kind == "counter":
                names |= {name.removesuffix("_total") + "_total"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def metrics_page() -> Iterator[str]:
    """/metrics of a real llmuxd after a sleep that freed nothing and with a model active."""
    port = free_port()
    models = {"a": sim_model(model_path="sim/a-1b", gpu_memory_utilization=0.6, sleep_level=1,
                             extra_args=[*FAST, "--sim-fault", "sleep_no_free"]),
              "b": sim_model(model_path="sim/b-1b", gpu_memory_utilization=0.6, sleep_level=1,
                             extra_args=FAST)}
    config: dict[str, Any] = {"metrics_port": port, "daemon": {"warmup": False}}

    def page() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return str(r.read().decode())

    with DaemonProcess(models, config=config, log_level="info") as d:
        assert d.request("POST", "/v1/models/a/start")[0] == 200
        d.wait_state("a", "active")
        d.request("POST", "/v1/models/b/switch")   # a's sleep frees nothing: a is stopped
        d.wait_state("b", "active")

        def settled() -> str | None:
            text = page()
            done = (metric_sum(text, "llmux_model_gpu_memory_mib", model="b") > 0
                    and metric_sum(text, "llmux_model_state", model="b", state="active") == 1)
            return text if done else None

        yield wait_until(settled, 30, "b active with its GPU memory on /metrics")


def test_sleep_verification_failures_and_model_memory_are_exported(metrics_page: str) -> None:
    assert metric_sum(metrics_page, "llmux_sleep_failures_total", model="a") == 1
    assert metric_sum(metrics_page, "llmux_sleep_failures_total", model="b") == 0
    assert metric_sum(metrics_page, "llmux_model_gpu_memory_mib", model="b") > 0
    assert metric_sum(metrics_page, "llmux_model_state", model="b", state="active") == 1


def test_every_metric_in_the_dashboard_and_rules_is_exported(metrics_page: str) -> None:
    exported = exported_names(metrics_page) | PROMETHEUS_MADE
    queries = dashboard_queries() + rule_queries()
    assert len(rule_queries()) == 5
    used = set().union(*(metric_names(q) for q in queries))
    assert {"llmux_model_state", "llmux_switch_total", "llmux_sleep_failures_total",
            "llmux_lease_refusals_total", "llmux_model_gpu_memory_mib",
            "llmux_request_duration_seconds_bucket"} <= used
    assert used - exported == set()


def test_dashboard_panels_use_the_datasource_variable_and_fit_the_grid() -> None:
    data = json.loads(DASHBOARD.read_text())
    assert data["uid"] == "llmux-overview"
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in data["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_deb_ships_the_dashboard_rules_and_router_example() -> None:
    """Every fleet file is in llmux.install (under /usr/share/llmux) and exists."""
    lines = (TOP / "packaging/deb/debian/llmux.install").read_text().splitlines()
    shipped = {src: dest for src, dest in (line.split() for line in lines if line.strip())}
    for path in (DASHBOARD, RULES, TOP / "etc/fleet/haproxy.cfg"):
        rel = str(path.relative_to(TOP))
        assert shipped.get(rel, "").startswith("usr/share/llmux/"), rel
        assert path.is_file(), rel
