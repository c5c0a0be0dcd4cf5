"""R3: the config loader under random and malformed input: a Config or a ConfigError.

Anything else (TypeError, KeyError, OverflowError, RecursionError...) is a crash
that ``llmuxd`` would show as a traceback. Bounded by example counts (a few seconds).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmuxd.config import Config, ConfigError, build_config, load_config, parse_text

FAST = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(), st.text(max_size=12), st.sampled_from(["0660", "0o777", "abc", "", "nan",
                                                        "$CREDENTIALS_DIRECTORY/k"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)

DAEMON_KEYS = ["socket", "socket_mode", "socket_group", "log_dir", "gpu_probe",
               "startup_timeout_secs", "max_queue_per_model", "max_connections",
               "idle_timeout_secs", "read_timeout_secs", "warmup"]
PROXY_KEYS = ["host", "port", "workers", "threads", "api_keys", "api_keys_file",
              "upstream_timeout_secs", "max_body_bytes"]
MODEL_KEYS = ["model_path", "port", "sleep_level", "gpu_memory_utilization",
              "tensor_parallel_size", "dtype", "extra_args", "gpus", "env", "aliases",
              "enable_sleep_mode", "startup_timeout_secs"]
TOP_KEYS = ["port", "metrics_port", "metrics_host", "vllm_command", "vllm_logging"]


def table(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Known keys with random values, plus now and then an unknown one."""
    return st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=6)), values,
                           max_size=len(keys))


configs = st.fixed_dictionaries({}, optional={
    "daemon": st.one_of(table(DAEMON_KEYS), values),
    "proxy": st.one_of(table(PROXY_KEYS), values),
    "policy": st.one_of(table(["policy_type", "request_timeout_secs", "sleep_level",
                               "min_active_secs", "drain_before_switch"]), values),
    "models": st.one_of(st.dictionaries(st.text(max_size=10),
                                        st.one_of(table(MODEL_KEYS), values), max_size=3),
                        values),
    **{k: values for k in TOP_KEYS},
})


def _loads_or_refuses(raw: Any) -> None:
    try:
        cfg = build_config(raw) if isinstance(raw, dict) else None
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) and e for e in exc.errors)
        return
    assert cfg is None or isinstance(cfg, Config)


@FAST
@given(configs)
def test_random_config_trees_load_or_are_refused_with_errors(raw):
    _loads_or_refuses(raw)


@FAST
@given(configs)
def test_random_configs_through_toml_and_json_files(raw):
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("c.json", _json(raw)), ("c.toml", _toml(raw))):
            if text is None:
                continue
            path = Path(tmp) / name
            path.write_text(text, encoding="utf-8", errors="surrogatepass")
            try:
                load_config(path)
            except ConfigError as exc:
                assert exc.errors


@FAST
@given(st.text(max_size=300))
def test_random_text_is_a_config_error_or_a_config(text):
    try:
        parse_text(text, Path("x.toml"))
        parse_text(text, Path("x.json"))
    except ConfigError as exc:
        assert exc.errors


@FAST
@given(st.binary(max_size=200))
def test_random_bytes_in_a_file_are_a_config_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.toml"
        path.write_bytes(data)
        try:
            load_config(path)
        except ConfigError as exc:
            assert exc.errors


def _json(raw: Any) -> str | None:
    try:
        return json.dumps(raw)
    except (ValueError, TypeError):
        return None


def _toml(raw: Any) -> str | None:
    try:
        return tomli_w.dumps(raw)
    except (TypeError, ValueError):
        return None       # None values, mixed arrays: not TOML at all
