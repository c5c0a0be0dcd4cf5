"""Config loading: the seed's JSON as is, defaults, and errors with key paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmuxd.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]

SEED_JSON = {
    "models": {
        "qwen-14b": {"model_path": "Qwen/Qwen3-14B", "port": 8001, "sleep_level": 1},
        "gemma-12b": {"model_path": "google/gemma-3-12b-it", "port": 8002, "sleep_level": 2},
    },
    "port": 3000,
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.errors


def test_seed_json_loads_with_seed_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "config.json", json.dumps(SEED_JSON)))
    qwen = cfg.models["qwen-14b"]
    assert (qwen.sleep_level, qwen.gpu_memory_utilization, qwen.tensor_parallel_size) == (1, 0.9, 1)
    assert (qwen.dtype, qwen.extra_args) == ("auto", ())
    assert (cfg.port, cfg.metrics_port, cfg.vllm_command, cfg.vllm_logging) == (
        3000, 9090, "vllm", False)
    p = cfg.policy
    assert (p.policy_type, p.request_timeout_secs, p.drain_before_switch, p.sleep_level) == (
        "fifo", 60.0, True, 3)
    assert cfg.daemon.startup_timeout_secs == 1800


def test_model_sleep_level_defaults_to_policy_level(tmp_path: Path) -> None:
    text = '[policy]\nsleep_level = 2\n[models.a]\nmodel_path = "m"\nport = 8001\n'
    assert load_config(write(tmp_path, "c.toml", text)).models["a"].sleep_level == 2


def test_shipped_config_is_valid() -> None:
    cfg = load_config(ROOT / "etc" / "llmux.toml")
    assert set(cfg.models) == {"qwen-14b", "gemma-12b"}


def test_every_error_is_reported_with_its_key_path(tmp_path: Path) -> None:
    text = """
metrics_port = -1
bogus = 1
[daemon]
socket_mode = "999"
[models.qwen-14b]
model_path = "x"
port = 8001
sleep_level = 4
gpu_memory_utilization = 1.5
[models.b]
port = 8001
"""
    errors = errors_of(write(tmp_path, "c.toml", text))
    assert "models.qwen-14b.sleep_level: must be 1, 2 or 3" in errors
    assert "models.qwen-14b.gpu_memory_utilization: must be in (0, 1]" in errors
    assert "models.b.model_path: is required" in errors
    assert "bogus: unknown key" in errors
    assert any(e.startswith("metrics_port:") for e in errors)
    assert any(e.startswith("daemon.socket_mode:") for e in errors)


def test_duplicate_ports_and_aliases_are_refused(tmp_path: Path) -> None:
    text = """
[daemon]
child_transport = "tcp"
[models.a]
model_path = "x"
port = 3000
aliases = ["b"]
[models.b]
model_path = "y"
port = 8002
"""
    errors = errors_of(write(tmp_path, "c.toml", text))
    assert "models.a.port: 3000 is already used by port" in errors
    assert "models.a.aliases: 'b' is already a model name or alias" in errors


def test_wrong_types_name_the_type(tmp_path: Path) -> None:
    text = '[models.a]\nmodel_path = "x"\nport = "8001"\nextra_args = "--foo"\n'
    errors = errors_of(write(tmp_path, "c.toml", text))
    assert 'models.a.port: must be an integer (got "8001")' in errors
    assert 'models.a.extra_args: must be a list of strings (got "--foo")' in errors


def test_unreadable_and_malformed_files_are_one_line_errors(tmp_path: Path) -> None:
    assert "cannot read" in errors_of(tmp_path / "missing.toml")[0]
    assert "invalid TOML" in errors_of(write(tmp_path, "bad.toml", "port = = 3"))[0]
    assert "invalid JSON" in errors_of(write(tmp_path, "bad.json", "{\"port\": }"))[0]


def test_aliases_resolve_to_their_model(tmp_path: Path) -> None:
    text = '[models.a]\nmodel_path = "x"\nport = 8001\naliases = ["gpt-4"]\n'
    cfg = load_config(write(tmp_path, "c.toml", text))
    model = cfg.resolve_model("gpt-4")
    assert model is not None and model.name == "a"
    assert cfg.resolve_model("nope") is None


def test_resolved_config_printed_by_check_config_loads_back_the_same(tmp_path: Path) -> None:
    from llmuxd.cli import render_toml

    original = load_config(ROOT / "etc" / "llmux.toml")
    again = load_config(write(tmp_path, "resolved.toml", render_toml(original)))
    assert again.to_dict() | {"source": ""} == original.to_dict() | {"source": ""}


def test_graceful_timeout_defaults_to_as_long_as_a_request_may_run(tmp_path: Path) -> None:
    """A reload restarts the front end's workers; by default their requests may finish
    (the wait for the model plus the whole answer), where gunicorn's own default cut
    every stream longer than 30 s."""
    base = 'vllm_command = "vllm"\n[models.m]\nmodel_path = "m"\nport = 8001\n'
    cfg = load_config(write(tmp_path, "a.toml", base + "[proxy]\nupstream_timeout_secs = 100\n"))
    assert cfg.proxy.graceful_secs == 160.0
    cfg = load_config(write(tmp_path, "b.toml", base + "[proxy]\ngraceful_timeout_secs = 5\n"))
    assert cfg.proxy.graceful_secs == 5.0
    errors = errors_of(write(tmp_path, "c.toml", base + "[proxy]\ngraceful_timeout_secs = -1\n"))
    assert any("proxy.graceful_timeout_secs" in e and "0" in e for e in errors), errors
