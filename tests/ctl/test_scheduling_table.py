"""llmuxctl status: the scheduling columns and lines, from the daemon's data."""

from __future__ import annotations

from llmuxctl.table import COLUMNS, scheduling_lines, seconds_cell, status_table


def model(name: str, state: str, **sched: object) -> dict[str, object]:
    base = {"waiting": 0, "oldest_wait_s": None, "quantum_left_s": None, "idle_s": None,
            "why_waiting": None, "waiting_reason": None}
    base.update(sched)
    return {"name": name, "state": state, "in_flight": 0, "queued": base["waiting"],
            "gpu_memory_mib": {}, "scheduling": base}


def test_seconds_cells():
    assert [seconds_cell(v) for v in (None, -1, 0, 2.44, 125, True)] == \
        ["-", "?", "0.0s", "2.4s", "2m", "-"]


def test_the_table_has_quantum_and_idle_columns():
    lines = status_table([model("a", "active", quantum_left_s=12.34, idle_s=None),
                          model("b", "sleeping", waiting=2)], now=0.0)
    header = lines[0]
    assert "QUANTUM" in COLUMNS and "IDLE" in COLUMNS
    row = lines[1]
    assert row[header.index("QUANTUM"):].lstrip().startswith("12.3s")


def test_policy_line_then_one_line_per_waiting_model():
    status = {"daemon": {"policy": "adaptive"}, "models": {
        "a": model("a", "active", quantum_left_s=3.0),
        "b": model("b", "sleeping", waiting=3, oldest_wait_s=4.25, why_waiting="'a' serves "
                   "its quantum (3.0s left)", waiting_reason="quantum"),
        "c": model("c", "sleeping")}}
    assert scheduling_lines(status) == [
        "policy: adaptive",
        "b: 3 waiting (oldest 4.2s): 'a' serves its quantum (3.0s left)"]


def test_an_old_daemon_without_scheduling_data_prints_no_lines():
    assert scheduling_lines({"models": {"a": {"name": "a", "state": "active"}}}) == []
