"""The llmux configuration: one typed tree, loaded from TOML or the seed's JSON.

Why a hand-written checker instead of a schema library: every error must name its
key path (``models.qwen-14b.sleep_level: must be 1, 2 or 3``), unknown keys are
errors (a typo must not silently fall back to a default), and all errors are
reported at once so an operator fixes the file in one pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SLEEP_LEVELS = (1, 2, 3)
POLICY_TYPES = ("fifo", "cost_aware", "time_slice", "adaptive")
GPU_PROBES = ("auto", "nvml", "sim", "none")
TRANSPORTS = ("unix", "tcp")
# AF_UNIX paths: 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
# extra_args that would move the child's listener away from where llmux talks to it.
LISTEN_FLAGS = ("--host", "--port", "--uds")
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


class ConfigError(Exception):
    """The config is unusable; ``errors`` holds one ``key.path: message`` per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


@dataclass(frozen=True)
class DaemonConfig:
    """How llmuxd itself runs: socket, logs, probe and the timeouts of every wait."""

    socket: str = "/run/llmux/llmuxd.sock"
    socket_mode: int = 0o660
    socket_group: str = ""
    log_dir: str = "/var/log/llmux"
    gpu_probe: str = "auto"
    sim_gpu_state: str = ""
    startup_timeout_secs: float = 1800.0
    sleep_timeout_secs: float = 120.0
    wake_timeout_secs: float = 600.0
    # Below request_timeout_secs (60): a drain that outlasts the requests it makes
    # room for only puts a model to sleep for nobody (issue 10).
    drain_timeout_secs: float = 30.0
    stop_timeout_secs: float = 15.0
    sleep_residue_mib: int = 2048
    max_queue_per_model: int = 512
    max_start_failures: int = 3
    restart_backoff_secs: float = 2.0
    warmup: bool = True
    max_connections: int = 1024
    idle_timeout_secs: float = 300.0
    read_timeout_secs: float = 10.0
    max_lease_secs: float = 0.0      # revoke a lease held longer (0: never; issue 12)
    child_transport: str = "unix"    # "unix": --uds in child_socket_dir; "tcp": 127.0.0.1:port
    child_socket_dir: str = "/run/llmux/children"
    validate_timeout_secs: float = 0.0   # a validate job's deadline (0: derived, see docs)
    # Health watchdog of the children (llmuxd/watchdog.py; period 0 turns it off).
    watchdog_period_secs: float = 5.0
    watchdog_timeout_secs: float = 5.0
    watchdog_misses: int = 3
    watchdog_stuck_secs: float = 0.0     # requests running, no token this long (0: off)
    # Host RAM llmux's model processes may hold (L1 sleepers keep their weights
    # there): bytes, "64GiB", "50%" of RAM, or "auto" = what leaves 10 % free.
    host_memory_limit: str = "auto"


@dataclass(frozen=True)
class ProxyConfig:
    """The OpenAI front end (gunicorn + Falcon) that llmuxd starts and supervises."""

    host: str = "0.0.0.0"
    port: int = 3000
    workers: int = 2
    threads: int = 128
    max_body_bytes: int = 16 * 1024 * 1024
    api_keys: tuple[str, ...] = ()
    upstream_timeout_secs: float = 600.0
    api_keys_file: str = ""
    # The asyncio front end's guards (issue 11; docs/configuration.md).
    upstream_idle_timeout_secs: float = 300.0
    client_write_timeout_secs: float = 30.0
    head_timeout_secs: float = 10.0
    body_timeout_secs: float = 60.0
    max_connections: int = 4096
    max_concurrent_body_parses: int = 4
    # How long a stopping worker's requests may still run (a reload restarts the
    # workers): 0 in the file means "derived", upstream_timeout_secs + 60.
    graceful_timeout_secs: float = 0.0

    @property
    def graceful_secs(self) -> float:
        """``graceful_timeout_secs``, or by default as long as a request may run: its
        wait for the model (60 s by default) and its whole answer."""
        return self.graceful_timeout_secs or self.upstream_timeout_secs + 60.0


@dataclass(frozen=True)
class PolicyConfig:
    """The seed's policy block (semantics kept), plus min_active_secs against thrash.

    The option names and defaults after ``min_active_secs`` are the Rust llmux 0.9
    ones (so its configs keep their meaning), then adaptive's; the planner hands
    them to the policy as ``policy.options.PolicyOptions`` (same names).
    """

    policy_type: str = "fifo"
    request_timeout_secs: float = 60.0
    drain_before_switch: bool = True
    sleep_level: int = 3
    min_active_secs: float = 0.0
    max_wait_secs: float = 15.0
    amortization_factor: float = 0.5
    coalesce_window_ms: float = 2000.0
    tick_interval_ms: float = 500.0
    min_quantum_ms: float = 2000.0
    default_switch_secs: float = 10.0
    linger_factor: float = 6.0


@dataclass(frozen=True)
class ModelConfig:
    """One model: how to start its vLLM child and how it sleeps."""

    name: str
    model_path: str
    port: int
    sleep_level: int = 3
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    extra_args: tuple[str, ...] = ()
    gpus: tuple[int, ...] = ()
    enable_sleep_mode: bool = True
    env: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    startup_timeout_secs: float = 0.0
    # Resolved by the loader: the model's own or daemon.child_transport (unix by
    # default). "tcp" here only for a ModelConfig built by hand (port, no socket).
    transport: str = "tcp"
    socket_path: str = ""            # derived (unix): <child_socket_dir>/<name>.sock

    # Upkeep (docs/scheduling.md): start at boot and sleep; TTL; never evicted.
    prewarm: bool = False
    idle_sleep_secs: float = 0.0
    keep_active: bool = False

    @property
    def upstream(self) -> str:
        """Where the child listens, as a lease names it: ``unix:/PATH`` or ``http://H:P``."""
        if self.transport == "unix":
            return f"unix:{self.socket_path}"
        return f"http://127.0.0.1:{self.port}"

    @property
    def max_num_seqs(self) -> int:
        """vLLM's batch limit as passed in extra_args (``--max-num-seqs``), else vLLM's 256."""
        args = list(self.extra_args)
        for i, arg in enumerate(args):
            value = None
            if arg == "--max-num-seqs" and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith("--max-num-seqs="):
                value = arg.split("=", 1)[1]
            if value is not None and value.isdigit() and int(value) > 0:
                return int(value)
        return 256

    @property
    def gpu_indices(self) -> tuple[int, ...]:
        """The GPUs this model runs on: explicit ``gpus`` or the first TP-many."""
        return self.gpus or tuple(range(self.tensor_parallel_size))


@dataclass(frozen=True)
class Config:
    """The whole resolved config; ``source`` is the file it came from."""

    models: dict[str, ModelConfig]
    port: int = 3000
    metrics_port: int = 9090
    vllm_command: str = "vllm"
    vllm_logging: bool = False
    metrics_host: str = "127.0.0.1"
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    source: str = ""

    def resolve_model(self, name: str) -> ModelConfig | None:
        """The model a request names, by its own name or one of its aliases."""
        model = self.models.get(name)
        if model is not None:
            return model
        for candidate in self.models.values():
            if name in candidate.aliases:
                return candidate
        return None

    def startup_timeout(self, model: ModelConfig) -> float:
        return model.startup_timeout_secs or self.daemon.startup_timeout_secs

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (for --check-config and the control API)."""
        data = asdict(self)
        data["daemon"]["socket_mode"] = f"{self.daemon.socket_mode:04o}"
        data["models"] = {name: _model_dict(m) for name, m in self.models.items()}
        return data


def _model_dict(model: ModelConfig) -> dict[str, Any]:
    data = asdict(model)
    data.pop("name")
    data.pop("socket_path")      # derived from the name and daemon.child_socket_dir
    return data


# ---------------------------------------------------------------------------
# Loading


def lease_socket_path(control_socket: str) -> str:
    """Where the lease listener lives, next to the control socket.

    ``/run/llmux/llmuxd.sock`` → ``/run/llmux/llmuxd.lease.sock``. A convention, so
    the front end needs no extra setting to find it."""
    path = Path(control_socket)
    if path.suffix == ".sock":
        return str(path.with_suffix(".lease.sock"))
    return str(path) + ".lease"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check a config file; raise ConfigError listing every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{p}: not UTF-8 text (byte {exc.start})"]) from None
    raw = parse_text(text, p)
    return build_config(raw, source=str(p))


def parse_text(text: str, path: Path) -> dict[str, Any]:
    """TOML, or JSON for a ``.json`` file or one that starts with ``{`` (the seed's format)."""
    is_json = path.suffix == ".json" or text.lstrip().startswith("{")
    try:
        data = json.loads(text) if is_json else tomllib.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a table/object"])
    return data


class _Checker:
    """Collects errors while reading typed values out of raw tables."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def fail(self, key: str, message: str) -> None:
        self.errors.append(f"{key}: {message}")

    def table(self, raw: dict[str, Any], key: str, name: str) -> dict[str, Any]:
        value = raw.get(name, {})
        if not isinstance(value, dict):
            self.fail(_join(key, name), "must be a table")
            return {}
        return value

    def unknown(self, raw: dict[str, Any], key: str, allowed: set[str]) -> None:
        for name in sorted(set(raw) - allowed):
            self.fail(_join(key, name), "unknown key")

    def get(self, raw: dict[str, Any], key: str, name: str, kind: str, default: Any) -> Any:
        if name not in raw:
            return default
        value = raw[name]
        path = _join(key, name)
        checked = _coerce(value, kind)
        if checked is _BAD:
            self.fail(path, f"must be {_KIND_WORDS[kind]} (got {json.dumps(value)})")
            return default
        if kind == "float" and not math.isfinite(checked):
            # TOML has nan and inf; nan passes every `<= 0` check and inf overflows
            # sleeps and deadlines, so neither is ever a usable number here.
            self.fail(path, f"must be a finite number (got {abs(checked)!r})")
            return default
        return checked


_BAD = object()
_KIND_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "strlist": "a list of strings",
    "intlist": "a list of integers",
    "strmap": "a table of strings",
}


def _coerce(value: Any, kind: str) -> Any:
    if kind == "int":
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok else _BAD
    if kind == "bool":
        return value if isinstance(value, bool) else _BAD
    if kind == "str":
        return value if isinstance(value, str) else _BAD
    if kind == "strlist":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return tuple(value) if ok else _BAD
    if kind == "intlist":
        ok = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
        return tuple(value) if ok else _BAD
    if kind == "strmap":
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        return dict(value) if ok else _BAD
    raise ValueError(kind)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _port_ok(c: _Checker, key: str, port: int, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        c.fail(key, f"must be a port number {low}-65535")


def _positive(c: _Checker, key: str, value: float) -> None:
    if value <= 0:
        c.fail(key, "must be greater than 0")


def build_config(raw: dict[str, Any], source: str = "") -> Config:
    """Turn parsed data into a Config, or raise ConfigError with every problem found."""
    c = _Checker()
    top_keys = {"models", "port", "metrics_port", "metrics_host", "vllm_command",
                "vllm_logging", "daemon", "proxy", "policy"}
    c.unknown(raw, "", top_keys)
    port = c.get(raw, "", "port", "int", 3000)
    _port_ok(c, "port", port)
    metrics_port = c.get(raw, "", "metrics_port", "int", 9090)
    _port_ok(c, "metrics_port", metrics_port, allow_zero=True)
    metrics_host = c.get(raw, "", "metrics_host", "str", "127.0.0.1")
    if not metrics_host.strip():
        c.fail("metrics_host", "must not be empty")
    vllm_command = c.get(raw, "", "vllm_command", "str", "vllm")
    if not vllm_command.strip():
        c.fail("vllm_command", "must not be empty")
    vllm_logging = c.get(raw, "", "vllm_logging", "bool", False)

    daemon = _build_daemon(c, c.table(raw, "", "daemon"))
    proxy = _build_proxy(c, c.table(raw, "", "proxy"), port, "port" in raw)
    policy = _build_policy(c, c.table(raw, "", "policy"))
    models = _build_models(c, c.table(raw, "", "models"), policy, daemon)

    used = {port: "port", metrics_port: "metrics_port"} if metrics_port else {port: "port"}
    if proxy.port != port:
        used[proxy.port] = "proxy.port"
    for name, model in models.items():
        if model.transport != "tcp":
            continue
        other = used.get(model.port)
        if other is not None:
            c.fail(f"models.{name}.port", f"{model.port} is already used by {other}")
        used[model.port] = f"models.{name}.port"
    names: dict[str, str] = {}
    for name, model in models.items():
        for alias in model.aliases:
            if alias in models or alias in names:
                c.fail(f"models.{name}.aliases", f"'{alias}' is already a model name or alias")
            names[alias] = name
    _keep_active_fits(c, models)

    if c.errors:
        raise ConfigError(c.errors)
    return Config(models=models, port=port, metrics_port=metrics_port,
                  metrics_host=metrics_host, vllm_command=vllm_command,
                  vllm_logging=vllm_logging, daemon=daemon,
                  proxy=proxy, policy=policy, source=source)


def _keep_active_fits(c: _Checker, models: dict[str, ModelConfig]) -> None:
    """keep_active models never leave their GPUs: they must fit together, and every
    other model must fit beside them, or it could never run (an error now, not a
    request that waits forever)."""
    kept: dict[int, float] = {}
    for model in models.values():
        if model.keep_active:
            for gpu in model.gpu_indices:
                kept[gpu] = kept.get(gpu, 0.0) + model.gpu_memory_utilization
    if not kept:
        return
    names = ", ".join(n for n, m in models.items() if m.keep_active)
    for gpu, load in sorted(kept.items()):
        if load > 1 + 1e-9:
            c.fail("models", f"the keep_active models ({names}) need {load:g} of GPU {gpu} "
                             f"together (more than 1)")
    for name, model in models.items():
        if model.keep_active:
            continue
        for gpu in model.gpu_indices:
            if gpu in kept and kept[gpu] + model.gpu_memory_utilization > 1 + 1e-9:
                c.fail(f"models.{name}", f"can never run: the keep_active models ({names}) "
                       f"hold {kept[gpu]:g} of GPU {gpu} and it needs "
                       f"{model.gpu_memory_utilization:g}")
                break


def _build_daemon(c: _Checker, raw: dict[str, Any]) -> DaemonConfig:
    d = DaemonConfig()
    key = "daemon"
    c.unknown(raw, key, set(DaemonConfig.__dataclass_fields__))
    mode_raw = c.get(raw, key, "socket_mode", "str", oct(d.socket_mode))
    try:
        mode = int(mode_raw, 8)
        if not 0 <= mode <= 0o777:
            raise ValueError
    except ValueError:
        c.fail(f"{key}.socket_mode", f"must be an octal mode like \"0660\" (got {mode_raw!r})")
        mode = d.socket_mode
    probe = c.get(raw, key, "gpu_probe", "str", d.gpu_probe)
    if probe not in GPU_PROBES:
        c.fail(f"{key}.gpu_probe", f"must be one of {', '.join(GPU_PROBES)}")
    values: dict[str, Any] = {"socket_mode": mode, "gpu_probe": probe}
    for name in ("socket", "socket_group", "log_dir", "sim_gpu_state", "child_transport",
                 "child_socket_dir"):
        values[name] = c.get(raw, key, name, "str", getattr(d, name))
    if not values["socket"]:
        c.fail(f"{key}.socket", "must not be empty")
    for name in ("startup_timeout_secs", "sleep_timeout_secs", "wake_timeout_secs",
                 "drain_timeout_secs", "stop_timeout_secs", "restart_backoff_secs",
                 "idle_timeout_secs", "read_timeout_secs"):
        values[name] = c.get(raw, key, name, "float", getattr(d, name))
        _positive(c, f"{key}.{name}", values[name])
    for name in ("sleep_residue_mib", "max_queue_per_model", "max_start_failures",
                 "max_connections"):
        values[name] = c.get(raw, key, name, "int", getattr(d, name))
        _positive(c, f"{key}.{name}", values[name])
    values["warmup"] = c.get(raw, key, "warmup", "bool", d.warmup)
    if values["child_transport"] not in TRANSPORTS:
        c.fail(f"{key}.child_transport", f"must be one of {', '.join(TRANSPORTS)}")
    if not os.path.isabs(values["child_socket_dir"]):
        c.fail(f"{key}.child_socket_dir", "must be an absolute path")
    values["max_lease_secs"] = c.get(raw, key, "max_lease_secs", "float", d.max_lease_secs)
    if values["max_lease_secs"] < 0:
        c.fail(f"{key}.max_lease_secs", "must not be negative (0 turns it off)")
    values["validate_timeout_secs"] = c.get(raw, key, "validate_timeout_secs", "float",
                                            d.validate_timeout_secs)
    if values["validate_timeout_secs"] < 0:
        c.fail(f"{key}.validate_timeout_secs", "must not be negative (0: derived)")
    for name in ("watchdog_period_secs", "watchdog_stuck_secs"):
        values[name] = c.get(raw, key, name, "float", getattr(d, name))
        if values[name] < 0:
            c.fail(f"{key}.{name}", "must not be negative (0 turns it off)")
    values["watchdog_timeout_secs"] = c.get(raw, key, "watchdog_timeout_secs", "float",
                                            d.watchdog_timeout_secs)
    _positive(c, f"{key}.watchdog_timeout_secs", values["watchdog_timeout_secs"])
    values["watchdog_misses"] = c.get(raw, key, "watchdog_misses", "int", d.watchdog_misses)
    _positive(c, f"{key}.watchdog_misses", values["watchdog_misses"])
    values["host_memory_limit"] = _host_limit(c, raw, key, d.host_memory_limit)
    return DaemonConfig(**values)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2,
               "mb": 1000**2, "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
               "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}


def parse_memory_limit(spec: str) -> tuple[str, float]:
    """``host_memory_limit``: ("auto", 0), ("percent", p) or ("bytes", n); ValueError if bad.

    Accepted: "auto", an integer byte count, a size with a unit ("64GiB", "500MB",
    "1.5 TiB"; GB = 10^9, GiB = 2^30), or a percentage of the host's RAM ("80%").
    """
    text = spec.strip().lower()
    if text == "auto":
        return "auto", 0.0
    if text.endswith("%"):
        pct = float(text[:-1])
        if not 0 < pct <= 100:
            raise ValueError("a percentage must be in (0, 100]")
        return "percent", pct
    num = text.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = text[len(num):].strip()
    if unit not in _SIZE_UNITS or not num:
        raise ValueError(f"unknown size {spec!r}")
    value = float(num) * _SIZE_UNITS[unit]
    if value <= 0:
        raise ValueError("must be greater than 0")
    return "bytes", value


def _host_limit(c: _Checker, raw: dict[str, Any], key: str, default: str) -> str:
    value = raw.get("host_memory_limit", default)
    path = f"{key}.host_memory_limit"
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        c.fail(path, f"must be \"auto\", a byte count, a size like \"64GiB\" or a "
                     f"percentage like \"80%\" (got {json.dumps(value)})")
        return default
    try:
        parse_memory_limit(value)
    except ValueError as exc:
        c.fail(path, f"must be \"auto\", a byte count, a size like \"64GiB\" or a "
                     f"percentage like \"80%\" ({exc})")
        return default
    return value


def _build_proxy(c: _Checker, raw: dict[str, Any], top_port: int, top_given: bool
                 ) -> ProxyConfig:
    d = ProxyConfig()
    key = "proxy"
    c.unknown(raw, key, set(ProxyConfig.__dataclass_fields__))
    port = c.get(raw, key, "port", "int", top_port)
    _port_ok(c, f"{key}.port", port)
    if "port" in raw and top_given and port != top_port:
        c.fail(f"{key}.port", f"conflicts with the top-level port {top_port}; set only one")
    values: dict[str, Any] = {"port": port}
    values["host"] = c.get(raw, key, "host", "str", d.host)
    for name in ("workers", "threads", "max_body_bytes"):
        values[name] = c.get(raw, key, name, "int", getattr(d, name))
        _positive(c, f"{key}.{name}", values[name])
    values["upstream_timeout_secs"] = c.get(raw, key, "upstream_timeout_secs", "float",
                                            d.upstream_timeout_secs)
    _positive(c, f"{key}.upstream_timeout_secs", values["upstream_timeout_secs"])
    for name in ("upstream_idle_timeout_secs", "client_write_timeout_secs",
                 "head_timeout_secs", "body_timeout_secs"):
        values[name] = c.get(raw, key, name, "float", getattr(d, name))
        _positive(c, f"{key}.{name}", values[name])
    for name in ("max_connections", "max_concurrent_body_parses"):
        values[name] = c.get(raw, key, name, "int", getattr(d, name))
        _positive(c, f"{key}.{name}", values[name])
    grace = c.get(raw, key, "graceful_timeout_secs", "float", d.graceful_timeout_secs)
    if grace < 0:
        c.fail(f"{key}.graceful_timeout_secs", "must be 0 (as long as a request may run) "
                                               "or more")
    values["graceful_timeout_secs"] = grace
    keys = c.get(raw, key, "api_keys", "strlist", d.api_keys)
    if any(not k for k in keys):
        c.fail(f"{key}.api_keys", "must not contain an empty key")
    keys_file = c.get(raw, key, "api_keys_file", "str", d.api_keys_file)
    if keys_file:
        file_keys = _read_keys_file(c, f"{key}.api_keys_file", keys_file)
        keys = tuple(dict.fromkeys((*keys, *file_keys)))
    values["api_keys"] = keys
    values["api_keys_file"] = keys_file
    return ProxyConfig(**values)


def _read_keys_file(c: _Checker, key: str, raw_path: str) -> tuple[str, ...]:
    """The keys of ``proxy.api_keys_file``: one a line, ``#`` comments and blanks skipped.

    Why a file: the config itself must stay readable by the daemon's group, but keys
    belong in a systemd credential (``LoadCredential=``, read from
    ``$CREDENTIALS_DIRECTORY``) or a root-only file. A file any user can read (or
    write) defeats that, so it is refused rather than warned about: a warning in a
    log is easily missed, a daemon that does not start is not.
    """
    wants_creds = "$CREDENTIALS_DIRECTORY" in raw_path or "${CREDENTIALS_DIRECTORY}" in raw_path
    if wants_creds and not os.environ.get("CREDENTIALS_DIRECTORY"):
        c.fail(key, "$CREDENTIALS_DIRECTORY is not set (systemd sets it from the unit's "
                    "LoadCredential=; outside the service: CREDENTIALS_DIRECTORY=/etc/llmux)")
        return ()
    path = os.path.expandvars(raw_path)
    if "\0" in path:  # open() would raise ValueError, not OSError
        c.fail(key, "the path contains a NUL byte")
        return ()
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read()
    except OSError as exc:
        c.fail(key, f"cannot read {path}: {exc.strerror or exc}")
        return ()
    except UnicodeDecodeError:
        c.fail(key, f"{path} is not UTF-8 text")
        return ()
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        c.fail(key, f"{path} is readable or writable by all users "
                    f"(mode {stat.S_IMODE(mode):04o}); run: chmod o-rwx {path}")
        return ()
    keys = tuple(line.strip() for line in text.splitlines()
                 if line.strip() and not line.strip().startswith("#"))
    if not keys:
        c.fail(key, f"{path} holds no key (one key per line)")
    return keys


def _build_policy(c: _Checker, raw: dict[str, Any]) -> PolicyConfig:
    d = PolicyConfig()
    key = "policy"
    c.unknown(raw, key, set(PolicyConfig.__dataclass_fields__))
    policy_type = c.get(raw, key, "policy_type", "str", d.policy_type)
    if policy_type not in POLICY_TYPES:
        c.fail(f"{key}.policy_type", f"must be one of {', '.join(POLICY_TYPES)}")
    timeout = c.get(raw, key, "request_timeout_secs", "float", d.request_timeout_secs)
    _positive(c, f"{key}.request_timeout_secs", timeout)
    level = c.get(raw, key, "sleep_level", "int", d.sleep_level)
    if level not in SLEEP_LEVELS:
        c.fail(f"{key}.sleep_level", "must be 1, 2 or 3")
    min_active = c.get(raw, key, "min_active_secs", "float", d.min_active_secs)
    if min_active < 0:
        c.fail(f"{key}.min_active_secs", "must not be negative")
    drain = c.get(raw, key, "drain_before_switch", "bool", d.drain_before_switch)
    options: dict[str, float] = {}
    for name in POLICY_OPTIONS:
        options[name] = c.get(raw, key, name, "float", getattr(d, name))
        if options[name] < 0 or options[name] != options[name]:
            c.fail(f"{key}.{name}", "must be a number >= 0")
    _positive(c, f"{key}.tick_interval_ms", options["tick_interval_ms"])
    return PolicyConfig(policy_type=policy_type, request_timeout_secs=timeout,
                        drain_before_switch=drain, sleep_level=level,
                        min_active_secs=min_active, **options)


def policy_warnings(config: Config) -> list[str]:
    """Usable but self-defeating scheduling settings (logged at start and reload, and
    printed by --check-config): each names its keys and what happens."""
    d, p = config.daemon, config.policy
    out = []
    if d.drain_timeout_secs >= p.request_timeout_secs:
        out.append(f"daemon.drain_timeout_secs ({d.drain_timeout_secs:g}) is not below "
                   f"policy.request_timeout_secs ({p.request_timeout_secs:g}): requests "
                   "waiting for a switch would time out before the drain gives up; llmuxd "
                   "ends such drains early for them (docs/configuration.md)")
    if p.policy_type != "fifo" and p.max_wait_secs >= p.request_timeout_secs:
        out.append(f"policy.max_wait_secs ({p.max_wait_secs:g}) is not below "
                   f"policy.request_timeout_secs ({p.request_timeout_secs:g}): a waiting "
                   "request times out (504) before the policy must serve it")
    return out


# The tuning knobs of the policies (cost_aware, time_slice, adaptive), in seconds
# unless the name says ms; each policy reads only its own (docs/configuration.md).
POLICY_OPTIONS = ("max_wait_secs", "amortization_factor", "coalesce_window_ms",
                  "tick_interval_ms", "min_quantum_ms", "default_switch_secs",
                  "linger_factor")


def socket_file_name(model_name: str) -> str:
    """The child's socket file name: ``<name>.sock`` for a short plain name, else a hash.

    AF_UNIX paths are short (107 bytes), so unlike log files there is no room for a
    readable slug of a long Hugging Face id; the hash keeps names distinct.
    """
    if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,39}", model_name):
        return f"{model_name}.sock"
    digest = hashlib.sha256(model_name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"m-{digest}.sock"


def name_problem(name: str) -> str:
    """Why ``name`` cannot name a model ("" when it can).

    Any name vLLM's ``--served-model-name`` takes is fine: Hugging Face ids with
    '/', dots, colons, unicode. Refused: empty, surrounding spaces, control
    characters (they break log lines and HTTP paths), and an empty path segment
    ('/x', 'x/', 'a//b'), which no client could type unambiguously.
    """
    if not name:
        return "must not be empty"
    if name.strip() != name:
        return "must not have surrounding spaces"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        return "must not contain control characters"
    if "" in name.split("/"):
        return "must not start or end with '/' or contain '//'"
    return ""


_MODEL_KEYS = set(ModelConfig.__dataclass_fields__) - {"name"}


def _build_models(c: _Checker, raw: dict[str, Any], policy: PolicyConfig,
                  daemon: DaemonConfig) -> dict[str, ModelConfig]:
    if not raw:
        c.fail("models", "at least one model is required")
    models: dict[str, ModelConfig] = {}
    for name, table in raw.items():
        key = f"models.{name}"
        problem = name_problem(name)
        if problem:
            c.fail(key, f"a model name {problem}")
        if not isinstance(table, dict):
            c.fail(key, "must be a table")
            continue
        model = _build_model(c, key, name, table, policy, daemon)
        if model is not None:
            models[name] = model
    return models


def _build_model(c: _Checker, key: str, name: str, raw: dict[str, Any],
                 policy: PolicyConfig, daemon: DaemonConfig) -> ModelConfig | None:
    c.unknown(raw, key, _MODEL_KEYS - {"socket_path"})
    transport = c.get(raw, key, "transport", "str", daemon.child_transport)
    if transport not in TRANSPORTS:
        c.fail(f"{key}.transport", f"must be one of {', '.join(TRANSPORTS)}")
    # A Unix-socket child needs no port; seed configs keep theirs (accepted, unused).
    required = ("model_path", "port") if transport == "tcp" else ("model_path",)
    missing = [k for k in required if k not in raw]
    for k in missing:
        c.fail(f"{key}.{k}", "is required")
    model_path = c.get(raw, key, "model_path", "str", "")
    if "model_path" in raw and not model_path:
        c.fail(f"{key}.model_path", "must not be empty")
    port = c.get(raw, key, "port", "int", 0)
    if "port" in raw:
        _port_ok(c, f"{key}.port", port)
    level = c.get(raw, key, "sleep_level", "int", policy.sleep_level)
    if level not in SLEEP_LEVELS:
        c.fail(f"{key}.sleep_level", "must be 1, 2 or 3")
    util = c.get(raw, key, "gpu_memory_utilization", "float", 0.9)
    if not 0 < util <= 1:
        c.fail(f"{key}.gpu_memory_utilization", "must be in (0, 1]")
    tp = c.get(raw, key, "tensor_parallel_size", "int", 1)
    _positive(c, f"{key}.tensor_parallel_size", tp)
    dtype = c.get(raw, key, "dtype", "str", "auto")
    if dtype not in DTYPES:
        c.fail(f"{key}.dtype", f"must be one of {', '.join(DTYPES)}")
    gpus = c.get(raw, key, "gpus", "intlist", ())
    if gpus and (len(set(gpus)) != len(gpus) or min(gpus) < 0):
        c.fail(f"{key}.gpus", "must be distinct GPU indices >= 0")
    if gpus and tp > 0 and len(gpus) != tp:
        c.fail(f"{key}.gpus", f"lists {len(gpus)} GPUs but tensor_parallel_size is {tp}")
    startup = c.get(raw, key, "startup_timeout_secs", "float", 0.0)
    if startup < 0:
        c.fail(f"{key}.startup_timeout_secs", "must not be negative")
    extra_args = c.get(raw, key, "extra_args", "strlist", ())
    listen = [a for a in extra_args if a.split("=", 1)[0] in LISTEN_FLAGS]
    if listen:
        c.fail(f"{key}.extra_args", f"{', '.join(listen)}: llmux chooses where the child "
               "listens (use transport / port)")
    socket_path = ""
    if transport == "unix":
        socket_path = os.path.join(daemon.child_socket_dir, socket_file_name(name))
        if len(socket_path.encode()) > MAX_SOCKET_PATH:
            c.fail(f"{key}", f"socket path {socket_path} is longer than {MAX_SOCKET_PATH} "
                   "bytes (AF_UNIX): choose a shorter daemon.child_socket_dir")
    sleep_mode = c.get(raw, key, "enable_sleep_mode", "bool", True)
    upkeep = _upkeep(c, key, raw, level, sleep_mode)
    if missing:
        return None
    return ModelConfig(
        name=name, model_path=model_path, port=port, sleep_level=level,
        gpu_memory_utilization=util, tensor_parallel_size=tp, dtype=dtype,
        extra_args=extra_args, gpus=gpus, transport=transport, socket_path=socket_path,
        enable_sleep_mode=sleep_mode,
        env=c.get(raw, key, "env", "strmap", {}),
        aliases=c.get(raw, key, "aliases", "strlist", ()), startup_timeout_secs=startup,
        **upkeep,
    )


def _upkeep(c: _Checker, key: str, raw: dict[str, Any], level: int, sleep_mode: bool
            ) -> dict[str, Any]:
    """prewarm, idle_sleep_secs, keep_active: each checked, and against each other."""
    prewarm = c.get(raw, key, "prewarm", "bool", False)
    idle = c.get(raw, key, "idle_sleep_secs", "float", 0.0)
    keep = c.get(raw, key, "keep_active", "bool", False)
    if idle < 0:
        c.fail(f"{key}.idle_sleep_secs", "must not be negative (0 = never)")
    if prewarm and level == 3:
        c.fail(f"{key}.prewarm", "needs sleep_level 1 or 2 (a model asleep at level 3 "
                                 "is stopped: nothing to prewarm)")
    if prewarm and not sleep_mode:
        c.fail(f"{key}.prewarm", "needs enable_sleep_mode = true")
    if keep and prewarm:
        c.fail(f"{key}.prewarm", "has no effect with keep_active = true (a keep_active "
                                 "model is started at boot and stays active); set one")
    if keep and idle > 0:
        c.fail(f"{key}.idle_sleep_secs", "conflicts with keep_active = true (a "
                                         "keep_active model never goes to sleep)")
    return {"prewarm": prewarm, "idle_sleep_secs": idle, "keep_active": keep}
