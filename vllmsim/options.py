"""Command-line and environment options of `llmux-sim-vllm serve`.

The vLLM flags llmuxd passes are parsed as vLLM parses them; any other vLLM flag is
accepted and logged (so configs written for real vLLM run unchanged). Simulator
knobs are `--sim-*` flags, each also settable by an `LLMUX_SIM_*` variable; a flag
wins over the variable.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vllmsim.faults import FaultError, Faults
from vllmsim.timing import Timing, size_from_model_name

DEFAULT_RESIDUE_MIB = 1341
DEFAULT_HOST_RAM_FACTOR = 1 / 1024
DEFAULT_MAX_MODEL_LEN = 8192

# (flag, env, type, default, help). Defaults of None are derived later.
SIM_KNOBS: list[tuple[str, str, type, object, str]] = [
    ("--sim-size-gib", "LLMUX_SIM_SIZE_GIB", float, None,
     "model weights in GiB (default: 2 x the 'NNb' hint in the model name, else 2)"),
    ("--sim-time-scale", "LLMUX_SIM_TIME_SCALE", float, 1.0,
     "multiplies every simulated duration (0.01 = 100x faster)"),
    ("--sim-d2h-gibps", "LLMUX_SIM_D2H_GIBPS", float, 50.0, "GPU->host GiB/s (L1 sleep)"),
    ("--sim-h2d-gibps", "LLMUX_SIM_H2D_GIBPS", float, 44.0, "host->GPU GiB/s (L1 wake, reload)"),
    ("--sim-disk-gibps", "LLMUX_SIM_DISK_GIBPS", float, 2.0, "disk GiB/s (load, reload)"),
    ("--sim-load-s", "LLMUX_SIM_LOAD_S", float, None, "weights load seconds (default size/disk)"),
    ("--sim-warmup-s", "LLMUX_SIM_WARMUP_S", float, 5.0, "start-up warm-up seconds"),
    ("--sim-token-rate", "LLMUX_SIM_TOKEN_RATE", float, 50.0, "tokens per second per request"),
    ("--sim-ttft-s", "LLMUX_SIM_TTFT_S", float, 0.05, "time to first token, seconds"),
    ("--sim-residue-mib", "LLMUX_SIM_RESIDUE_MIB", int, DEFAULT_RESIDUE_MIB,
     "MiB per GPU a sleeping engine keeps (CUDA context)"),
    ("--sim-host-ram-factor", "LLMUX_SIM_HOST_RAM_FACTOR", float, DEFAULT_HOST_RAM_FACTOR,
     "host RAM really allocated for L1-offloaded weights = size x factor"),
    ("--sim-gpu-state", "LLMUX_SIM_GPU_STATE", str, "", "simulated GPU state directory"),
    ("--sim-embedding-dims", "LLMUX_SIM_EMBEDDING_DIMS", int, 256, "embedding vector length"),
]


@dataclass
class SimOptions:
    """Everything one `serve` run needs."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    uds: str = ""                 # --uds PATH: a Unix socket instead of host:port (vLLM's)
    served_model_names: list[str] = field(default_factory=list)
    enable_sleep_mode: bool = False
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    api_key: str | None = None
    embedding: bool = False
    timing: Timing = field(default_factory=Timing)
    residue_mib: int = DEFAULT_RESIDUE_MIB
    host_ram_factor: float = DEFAULT_HOST_RAM_FACTOR
    gpu_state: str = ""
    embedding_dims: int = 256
    faults: Faults = field(default_factory=Faults)
    fault_api: bool = False
    real_cuda: bool = False
    dev_mode: bool = False
    keep_alive_s: float = 5.0
    unknown_args: list[str] = field(default_factory=list)

    @property
    def model_name(self) -> str:
        """The first served name: the id in /v1/models, responses and metric labels."""
        return self.served_model_names[0]


class OptionsError(ValueError):
    """Bad command line or environment (the CLI prints it and exits 2)."""


def _truthy(text: str | None) -> bool:
    return (text or "").strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmux-sim-vllm serve",
        description="Serve a simulated vLLM model (same CLI and HTTP API as `vllm serve`).",
    )
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--uds", default="",
                   help="Unix domain socket path. If set, host and port arguments are ignored.")
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--enable-sleep-mode", action="store_true")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--runner", default=None)
    p.add_argument("--convert", default=None)
    p.add_argument("--task", default=None)
    for flag, env, typ, default, help_ in SIM_KNOBS:
        p.add_argument(flag, type=typ, default=None, help=f"{help_} [env {env}, default {default}]")
    p.add_argument("--sim-fault", action="append", default=[], metavar="NAME[=ARG]",
                   help="inject a fault (repeatable) [env LLMUX_SIM_FAULTS, comma list]")
    p.add_argument("--sim-fault-api", action="store_true",
                   help="enable POST /_sim/faults and GET /_sim/state [env LLMUX_SIM_FAULT_API=1]")
    p.add_argument("--sim-real-cuda", action="store_true",
                   help="the engine child really allocates its GPU share with torch "
                   "[env LLMUX_SIM_REAL_CUDA=1]")
    return p


def parse_serve(argv: Sequence[str], env: Mapping[str, str] | None = None) -> SimOptions:
    """Parse `serve` arguments (without the word `serve`) plus the environment."""
    env = os.environ if env is None else env
    parser = build_parser()
    ns, unknown = parser.parse_known_args(list(argv))
    knobs: dict[str, object] = {}
    for flag, envname, typ, default, _ in SIM_KNOBS:
        key = flag[2:].replace("-", "_")
        value = getattr(ns, key)
        if value is None and env.get(envname, "") != "":
            try:
                value = typ(env[envname])
            except ValueError:
                raise OptionsError(f"{envname}: bad value {env[envname]!r}") from None
        knobs[key] = default if value is None else value

    fault_specs = list(ns.sim_fault)
    fault_specs += [s for s in env.get("LLMUX_SIM_FAULTS", "").split(",") if s.strip()]
    try:
        faults = Faults(fault_specs)
    except FaultError as e:
        raise OptionsError(str(e)) from None

    size = knobs["sim_size_gib"]
    timing = Timing(
        size_gib=float(size) if size is not None else size_from_model_name(ns.model),  # type: ignore[arg-type]
        d2h_gibps=float(knobs["sim_d2h_gibps"]),  # type: ignore[arg-type]
        h2d_gibps=float(knobs["sim_h2d_gibps"]),  # type: ignore[arg-type]
        disk_gibps=float(knobs["sim_disk_gibps"]),  # type: ignore[arg-type]
        load_s=None if knobs["sim_load_s"] is None else float(knobs["sim_load_s"]),  # type: ignore[arg-type]
        warmup_s=float(knobs["sim_warmup_s"]),  # type: ignore[arg-type]
        token_rate=float(knobs["sim_token_rate"]),  # type: ignore[arg-type]
        ttft_s=float(knobs["sim_ttft_s"]),  # type: ignore[arg-type]
        scale=float(knobs["sim_time_scale"]),  # type: ignore[arg-type]
    )
    for name in ("d2h_gibps", "h2d_gibps", "disk_gibps"):
        if getattr(timing, name) <= 0:
            raise OptionsError(f"--sim-{name.replace('_', '-')} must be > 0")
    if timing.scale < 0 or timing.size_gib < 0 or timing.token_rate < 0:
        raise OptionsError("time scale, size and token rate must be >= 0")
    if not 0 < ns.gpu_memory_utilization <= 1:
        raise OptionsError("--gpu-memory-utilization must be in (0, 1]")
    if ns.tensor_parallel_size < 1:
        raise OptionsError("--tensor-parallel-size must be >= 1")
    if not 1 <= ns.port <= 65535 and ns.port != 0:
        raise OptionsError("--port must be 0..65535")

    embedding = (
        ns.runner == "pooling"
        or ns.convert == "embed"
        or ns.task in ("embed", "embedding")
        or "embed" in ns.model.lower()
    )
    return SimOptions(
        model=ns.model,
        host=ns.host,
        port=ns.port,
        uds=ns.uds,
        served_model_names=list(ns.served_model_name or [ns.model]),
        enable_sleep_mode=ns.enable_sleep_mode,
        gpu_memory_utilization=ns.gpu_memory_utilization,
        tensor_parallel_size=ns.tensor_parallel_size,
        dtype=ns.dtype,
        max_model_len=ns.max_model_len or DEFAULT_MAX_MODEL_LEN,
        api_key=ns.api_key or env.get("VLLM_API_KEY") or None,
        embedding=embedding,
        timing=timing,
        residue_mib=int(knobs["sim_residue_mib"]),  # type: ignore[call-overload]
        host_ram_factor=float(knobs["sim_host_ram_factor"]),  # type: ignore[arg-type]
        gpu_state=str(knobs["sim_gpu_state"] or ""),
        embedding_dims=int(knobs["sim_embedding_dims"]),  # type: ignore[call-overload]
        faults=faults,
        fault_api=ns.sim_fault_api or _truthy(env.get("LLMUX_SIM_FAULT_API")),
        real_cuda=ns.sim_real_cuda or _truthy(env.get("LLMUX_SIM_REAL_CUDA")),
        dev_mode=_truthy(env.get("VLLM_SERVER_DEV_MODE")),
        keep_alive_s=float(env.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE") or 5),
        unknown_args=unknown,
    )


def visible_gpus(opts: SimOptions, env: Mapping[str, str]) -> list[int]:
    """Physical GPU indices this server uses: the first tp of CUDA_VISIBLE_DEVICES."""
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is None or cvd.strip() == "":
        return list(range(opts.tensor_parallel_size))
    try:
        ids = [int(x) for x in cvd.split(",") if x.strip()]
    except ValueError:
        raise OptionsError(
            f"CUDA_VISIBLE_DEVICES={cvd!r}: only integer indices are simulated"
        ) from None
    return ids[: opts.tensor_parallel_size] if len(ids) >= opts.tensor_parallel_size else ids
