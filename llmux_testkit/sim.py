"""Test helpers: run `llmux-sim-vllm serve` as a real child process, safely.

`SimProcess` starts the simulator on a free port in its own process group, waits for
/health with a deadline, and on exit stops the whole group (SIGTERM, grace,
SIGKILL) and reaps it, so a test can never leave a server (or its engine child)
behind. Used by the simulator's own tests and by the daemon and front-end tests:

    from llmux_testkit.sim import SimProcess, init_gpus

    with SimProcess("Qwen/Qwen3-14B", gpu_state=init_gpus(tmp_path / "gpus")) as sim:
        sim.post("/v1/completions", {"prompt": "hi", "max_tokens": 4, "temperature": 0})
        sim.post("/sleep?level=1")
        assert sim.get("/is_sleeping").json() == {"is_sleeping": True}
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

from vllmsim.gpustate import GpuState

DEFAULT_TIME_SCALE = 0.01


class SimExited(RuntimeError):
    """The simulator exited while we waited for it; carries its exit code and log."""

    def __init__(self, code: int | None, log: str) -> None:
        super().__init__(f"llmux-sim-vllm exited with {code}:\n{log[-3000:]}")
        self.code = code
        self.log = log


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago and that this process has not handed out before.

    bind(0) + close can give the same port to two calls in a row (CI saw a model's
    port equal to the front end's, both taken for one config); remembering what was
    handed out keeps the ports of one config, and of one test run, distinct.
    """
    for _ in range(1000):
        with contextlib.closing(socket.socket()) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port that was not already handed out")


def init_gpus(directory: str | os.PathLike[str], count: int = 1, total_mib: int = 81920) -> Path:
    """Create a simulated-GPU directory with `count` GPUs of `total_mib` each."""
    GpuState(directory).init(count, total_mib)
    return Path(directory)


def wait_for(cond: Callable[[], object], timeout: float, what: str = "condition",
             interval: float = 0.02) -> Any:
    """Poll `cond` until it returns something truthy; raise TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def kill_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int | None:
    """SIGTERM the process group, wait `grace`, SIGKILL it, reap; the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # also any engine child left in the group
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    return proc.returncode


class SimProcess:
    """One `llmux-sim-vllm serve` child: start, wait healthy, talk to it, stop it.

    Arguments map to `serve` flags; `args` adds any others (e.g. `--sim-fault`).
    Defaults suit tests: dev mode on (sleep endpoints), `--enable-sleep-mode`, the
    fault API on, time scale 0.01. `log_path` defaults to a temp file.
    """

    def __init__(
        self,
        model: str = "sim/test-model",
        *,
        args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        served_model_name: str | None = None,
        gpu_state: str | os.PathLike[str] | None = None,
        cuda_visible_devices: str | None = None,
        gpu_memory_utilization: float | None = None,
        faults: Iterable[str] = (),
        time_scale: float | None = DEFAULT_TIME_SCALE,
        sleep_mode: bool = True,
        dev_mode: bool = True,
        fault_api: bool = True,
        log_path: str | os.PathLike[str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.model = model
        self.host = host
        self.port = port or free_port(host)
        self.served_model_name = served_model_name or model
        argv = list(command or [sys.executable, "-m", "vllmsim.cli"])
        argv += ["serve", model, "--host", host, "--port", str(self.port)]
        if served_model_name:
            argv += ["--served-model-name", served_model_name]
        if sleep_mode:
            argv.append("--enable-sleep-mode")
        if gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
        if gpu_state is not None:
            argv += ["--sim-gpu-state", str(gpu_state)]
        if time_scale is not None:
            argv += ["--sim-time-scale", str(time_scale)]
        for f in faults:
            argv += ["--sim-fault", f]
        if fault_api:
            argv.append("--sim-fault-api")
        argv += list(args)
        self.argv = argv
        full_env = dict(os.environ if env is None else env)
        for k in [k for k in full_env if k.startswith("LLMUX_SIM_")]:
            if env is None:  # don't inherit a caller's sim knobs by accident
                del full_env[k]
        if dev_mode:
            full_env["VLLM_SERVER_DEV_MODE"] = "1"
        else:
            full_env.pop("VLLM_SERVER_DEV_MODE", None)
        if cuda_visible_devices is not None:
            full_env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
        self.env = full_env
        if log_path is None:
            import tempfile

            fd, name = tempfile.mkstemp(prefix="llmux-sim-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> SimProcess:
        """Spawn the server in a new session (its own process group); do not wait."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def wait_healthy(self, timeout: float = 60.0) -> SimProcess:
        """Poll GET /health until 200; raise SimExited if the process dies first."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.poll()
            if code is not None:
                raise SimExited(code, self.log())
            try:
                r = requests.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"llmux-sim-vllm not healthy after {timeout:.0f} s:\n{self.log()[-3000:]}")
            time.sleep(0.02)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit on its own; its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the group, wait `grace`, SIGKILL the group, reap."""
        self.session.close()
        if self.proc is None:
            return None
        return kill_group(self.proc, grace)

    def signal(self, sig: int) -> None:
        """Send `sig` to the API-server process only."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> SimProcess:
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- talking to it -----------------------------------------------------------------

    def get(self, path: str, timeout: float = 30.0, **kw: Any) -> requests.Response:
        return self.session.get(self.url + path, timeout=timeout, **kw)

    def post(self, path: str, json: object = None, timeout: float = 30.0,
             **kw: Any) -> requests.Response:
        return self.session.post(self.url + path, json=json, timeout=timeout, **kw)

    def state(self) -> dict[str, Any]:
        """GET /_sim/state (needs fault_api=True)."""
        r = requests.get(self.url + "/_sim/state", timeout=10)
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def set_faults(self, set_: Mapping[str, object] | None = None,
                   clear: Iterable[str] = ()) -> dict[str, Any]:
        """POST /_sim/faults (needs fault_api=True); the faults now active."""
        r = requests.post(self.url + "/_sim/faults",
                          json={"set": dict(set_ or {}), "clear": list(clear)}, timeout=10)
        r.raise_for_status()
        out: dict[str, Any] = r.json()["faults"]
        return out

    def engine_pid(self) -> int:
        """The EngineCore child's pid (the pid that holds the simulated GPU memory)."""
        return int(self.state()["engine_pid"])
