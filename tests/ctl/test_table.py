"""The status table's cells and the socket resolution order, in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmuxctl.errors import DEFAULT_SOCKET, UsageError
from llmuxctl.locate import resolve
from llmuxctl.table import align, duration, last_switch_cell, mib, state_phrase


def test_duration_reads_like_supervisorctl_uptime() -> None:
    assert duration(0) == "0:00:00"
    assert duration(3725.9) == "1:02:05"
    assert duration(2 * 86400 + 61) == "2d 0:01:01"
    assert duration(None) == "-"


def test_gpu_memory_is_the_sum_over_gpus() -> None:
    assert mib({"0": 1331, "1": 1331}) == "2662 MiB"
    assert mib({}) == "-"
    assert mib(None) == "-"


def test_last_switch_cell() -> None:
    switch = {"from": None, "to": "alpha", "result": "ok", "started_at": 1000.0,
              "total_ms": 510.0}
    assert last_switch_cell(switch, now=1125.0) == "->alpha ok 0.51s, 2m ago"
    assert last_switch_cell(None, now=0) == "-"


def test_align_pads_columns_and_right_aligns_numbers() -> None:
    lines = align(("NAME", "PID", "NOTE"), [["a", "7", "x"], ["long", "12345", "y"]],
                  frozenset({"PID"}))
    assert lines == ["NAME  PID    NOTE", "a         7  x", "long  12345  y"]


def test_state_phrase() -> None:
    assert state_phrase({"state": "sleeping", "sleep_level": 2, "pid": 9}) == \
        "asleep at L2 (pid 9)"
    assert state_phrase({"state": "active", "pid": 9, "port": 8001}) == \
        "active (pid 9, port 8001)"
    assert state_phrase({"state": "stopped", "pid": None}) == "stopped"


def test_socket_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "llmux.toml"
    config.write_text('[daemon]\nsocket = "/from/config.sock"\n'
                      '[models.m]\nmodel_path = "x"\nport = 8001\n')
    env = {"LLMUX_SOCKET": "/from/env.sock"}
    assert resolve("/from/flag.sock", str(config), env).socket == "/from/flag.sock"
    assert resolve(None, str(config), env).socket == "/from/env.sock"
    target = resolve(None, str(config), {})
    assert (target.socket, target.config_models) == ("/from/config.sock", ("m",))
    monkeypatch.setattr("llmuxctl.locate.DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    assert resolve(None, None, {}).socket == DEFAULT_SOCKET
    monkeypatch.setattr("llmuxctl.locate.DEFAULT_CONFIG", str(config))
    assert resolve(None, None, {}).socket == "/from/config.sock"
    with pytest.raises(UsageError):
        resolve(None, str(tmp_path / "missing.toml"), {})
