"""Config hardening: non-finite numbers, metrics_host, api_keys_file, secrets redacted."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from llmuxd.config import ConfigError, load_config

BASE = '[models.a]\nmodel_path = "x"\nport = 8001\n'


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.errors


@pytest.mark.parametrize("key,table", [
    ("startup_timeout_secs", "daemon"), ("drain_timeout_secs", "daemon"),
    ("restart_backoff_secs", "daemon"), ("upstream_timeout_secs", "proxy"),
    ("request_timeout_secs", "policy"), ("min_active_secs", "policy"),
])
@pytest.mark.parametrize("value", ["nan", "inf", "-nan", "+inf"])
def test_nan_and_inf_are_refused_where_a_number_is_due(tmp_path, key, table, value):
    errors = errors_of(write(tmp_path, f"[{table}]\n{key} = {value}\n" + BASE))
    assert errors == [f"{table}.{key}: must be a finite number (got {value.lstrip('+-')})"]


def test_nan_model_numbers_are_refused(tmp_path):
    text = BASE + "gpu_memory_utilization = nan\nstartup_timeout_secs = inf\n"
    errors = errors_of(write(tmp_path, text))
    assert "models.a.gpu_memory_utilization: must be a finite number (got nan)" in errors
    assert "models.a.startup_timeout_secs: must be a finite number (got inf)" in errors


def test_metrics_host_defaults_to_loopback(tmp_path):
    assert load_config(write(tmp_path, BASE)).metrics_host == "127.0.0.1"
    cfg = load_config(write(tmp_path, 'metrics_host = "0.0.0.0"\n' + BASE))
    assert cfg.metrics_host == "0.0.0.0"
    assert errors_of(write(tmp_path, 'metrics_host = ""\n' + BASE)) == [
        "metrics_host: must not be empty"]


def test_connection_limits_are_checked(tmp_path):
    text = ("[daemon]\nmax_connections = 0\nidle_timeout_secs = -1\n"
            "read_timeout_secs = nan\n" + BASE)
    assert errors_of(write(tmp_path, text)) == [
        "daemon.idle_timeout_secs: must be greater than 0",
        "daemon.read_timeout_secs: must be a finite number (got nan)",
        "daemon.max_connections: must be greater than 0",
    ]


# -- api_keys_file ---------------------------------------------------------------------


def keys_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "api-keys"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_api_keys_file_is_merged_into_api_keys(tmp_path):
    kf = keys_file(tmp_path, "# llmux keys\n\nsk-file-1\n  sk-file-2  \nsk-inline\n")
    text = f'[proxy]\napi_keys = ["sk-inline"]\napi_keys_file = "{kf}"\n' + BASE
    cfg = load_config(write(tmp_path, text))
    assert cfg.proxy.api_keys == ("sk-inline", "sk-file-1", "sk-file-2")


def test_api_keys_file_path_expands_credentials_directory(tmp_path, monkeypatch):
    keys_file(tmp_path, "sk-cred\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    text = '[proxy]\napi_keys_file = "$CREDENTIALS_DIRECTORY/api-keys"\n' + BASE
    assert load_config(write(tmp_path, text)).proxy.api_keys == ("sk-cred",)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    errors = errors_of(write(tmp_path, text))
    assert errors == ["proxy.api_keys_file: $CREDENTIALS_DIRECTORY is not set (systemd "
                      "sets it from the unit's LoadCredential=; outside the service: "
                      "CREDENTIALS_DIRECTORY=/etc/llmux)"]


def test_api_keys_file_re_read_on_each_load(tmp_path):
    kf = keys_file(tmp_path, "sk-old\n")
    path = write(tmp_path, f'[proxy]\napi_keys_file = "{kf}"\n' + BASE)
    assert load_config(path).proxy.api_keys == ("sk-old",)
    kf.write_text("sk-new\n")
    assert load_config(path).proxy.api_keys == ("sk-new",)


def test_world_readable_or_missing_or_empty_keys_file_is_refused(tmp_path):
    kf = keys_file(tmp_path, "sk-1\n", mode=0o644)
    text = f'[proxy]\napi_keys_file = "{kf}"\n' + BASE
    assert errors_of(write(tmp_path, text)) == [
        f"proxy.api_keys_file: {kf} is readable or writable by all users (mode 0644); "
        f"run: chmod o-rwx {kf}"]
    kf.chmod(0o640)
    kf.write_text("# only comments\n\n")
    assert errors_of(write(tmp_path, text)) == [
        f"proxy.api_keys_file: {kf} holds no key (one key per line)"]
    kf.unlink()
    errors = errors_of(write(tmp_path, text))
    assert errors == [f"proxy.api_keys_file: cannot read {kf}: No such file or directory"]


# -- --check-config redacts secrets ----------------------------------------------------

SECRET_ENV = {
    "HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz012345",
    "MY_API_KEY": "short",
    "WANDB_PASSWORD": "pw",
    "OPAQUE": "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
    "GH": "ghp_0123456789abcdefghij",
    "VLLM_LOGGING_LEVEL": "DEBUG",
    "CUDA_VISIBLE_DEVICES": "0,1",
    "HF_HOME": "/var/lib/llmux/hf-cache-0123456789abcdefghij",
}


def check_config(path: Path, *extra: str) -> str:
    env = {**os.environ}
    r = subprocess.run([sys.executable, "-m", "llmuxd", "-c", str(path), "--check-config",
                        *extra], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("as_json", [False, True])
def test_check_config_redacts_api_keys_and_token_like_env(tmp_path, as_json):
    kf = keys_file(tmp_path, "sk-from-file-secret\n")
    env = ", ".join(f'{k} = "{v}"' for k, v in SECRET_ENV.items())
    text = (f'[proxy]\napi_keys = ["sk-inline-secret"]\napi_keys_file = "{kf}"\n'
            + BASE + f"env = {{{env}}}\n")
    out = check_config(write(tmp_path, text), *(["--json"] if as_json else []))
    for secret in ("sk-inline-secret", "sk-from-file-secret", "hf_abcdef", "short", "pw",
                   "A1b2C3d4", "ghp_0123"):
        assert secret not in out
    for kept in ("DEBUG", "0,1", "/var/lib/llmux/hf-cache-0123456789abcdefghij", str(kf)):
        assert kept in out
    if not as_json:
        data = tomllib.loads(out)
        assert data["proxy"]["api_keys"] == ["<redacted>", "<redacted>"]
        assert data["models"]["a"]["env"]["HF_TOKEN"] == "<redacted>"


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    """Found by tests/fuzz: b"\\x80" in the file was a UnicodeDecodeError traceback."""
    path = tmp_path / "c.toml"
    path.write_bytes(b"port = 3000\n# caf\xe9\n")
    assert errors_of(path) == [f"{path}: not UTF-8 text (byte 17)"]


def test_a_keys_file_path_with_a_nul_byte_is_one_readable_error(tmp_path):
    # Found by the config fuzzer: open() raised ValueError ("embedded null byte").
    text = '[proxy]\napi_keys_file = "keys\\u0000.txt"\n' + BASE
    assert errors_of(write(tmp_path, text)) == [
        "proxy.api_keys_file: the path contains a NUL byte"]
