"""Helpers to run a real llmuxd in tests: temp config, simulated GPUs, plain HTTP on the socket.

Shared by the daemon, front-end, ctl and packaging tests, so every suite starts
the daemon the same way and never leaves a process behind:

    with DaemonProcess(models={"a": {"port": free_port()}}) as d:
        status, body = d.request("POST", "/v1/leases", {"model": "a"})

The daemon runs in its own session (process group); ``stop()`` sends SIGTERM,
waits, and kills the group and every known child on any failure.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from llmux_testkit.sim import free_port
from llmuxd import tomlout

SIM_COMMAND = "llmux-sim-vllm"


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX stream socket."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def _exchange(conn: http.client.HTTPConnection, method: str, url: str,
              body: Any) -> tuple[int, Any]:
    """Send one JSON request on ``conn`` and close it: (status, parsed JSON or text)."""
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, url, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


def post_json(host: str, port: int, path: str, body: Any,
              timeout: float = 60.0) -> tuple[int, Any]:
    """POST ``body`` as JSON over TCP on a fresh connection: (status, JSON or text)."""
    return _exchange(http.client.HTTPConnection(host, port, timeout=timeout), "POST",
                     path, body)


def unix_request(path: str, method: str, url: str, body: Any = None,
                 timeout: float = 60.0) -> tuple[int, Any]:
    """One request on a fresh connection; returns (status, parsed JSON or text)."""
    return _exchange(UnixHTTPConnection(path, timeout=timeout), method, url, body)


def write_toml(path: Path, data: dict[str, Any]) -> None:
    """Write a nested dict as TOML (top-level scalars, then tables, then models.*)."""
    path.write_text(tomlout.dumps(data))


def sim_model(port: int | None = None, **extra: Any) -> dict[str, Any]:
    """A model table for the simulator (model_path is just a label for it)."""
    table: dict[str, Any] = {"model_path": "sim/model", "port": port or free_port()}
    table.update(extra)
    return table


class DaemonProcess:
    """A real ``llmuxd`` subprocess with its own temp dir, config, socket and sim GPUs.

    ``models``: {name: model table} (use ``sim_model()``); ``config``: extra top-level
    keys/tables merged over the defaults (e.g. {"daemon": {"drain_timeout_secs": 5}});
    ``env``: extra environment for the daemon and so its children (LLMUX_SIM_*).
    ``gpus``/``gpu_mib``: simulated GPUs initialised in ``<tmp>/gpus``.
    """

    def __init__(self, models: dict[str, dict[str, Any]], config: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, *, frontend: bool = False,
                 gpus: int = 1, gpu_mib: int = 81920, tmp: str | Path | None = None,
                 start_timeout: float = 60.0, log_level: str = "debug") -> None:
        self._own_tmp = tmp is None
        self.tmp = Path(tmp or tempfile.mkdtemp(prefix="llmuxd-test-"))
        self.socket = str(self.tmp / "llmuxd.sock")
        self.gpu_dir = self.tmp / "gpus"
        self.log_dir = self.tmp / "logs"
        self.config_path = self.tmp / "llmux.toml"
        self.stdout_path = self.tmp / "llmuxd.out"
        self.models = models
        self.extra = config or {}
        self.env_extra = env or {}
        self.frontend = frontend
        self.gpus = gpus
        self.gpu_mib = gpu_mib
        self.start_timeout = start_timeout
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen_pids: set[int] = set()

    # -- config -----------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        daemon = {"socket": self.socket, "log_dir": str(self.log_dir), "gpu_probe": "sim",
                  "sim_gpu_state": str(self.gpu_dir), "startup_timeout_secs": 60.0,
                  "stop_timeout_secs": 5.0, "restart_backoff_secs": 0.5,
                  "drain_timeout_secs": 10.0, "sleep_timeout_secs": 10.0,
                  "wake_timeout_secs": 20.0, "sleep_residue_mib": 2048,
                  # The suites written before issue 12 talk to children by port
                  # (faults, upstream_post); tests/reliability runs the default (unix).
                  "child_transport": "tcp",
                  "child_socket_dir": str(self.tmp / "children")}
        data: dict[str, Any] = {"port": free_port(), "metrics_port": 0,
                                "vllm_command": SIM_COMMAND}
        data["daemon"] = daemon
        data["policy"] = {"request_timeout_secs": 60.0}
        for key, value in self.extra.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        data["models"] = self.models
        return data

    def write_config(self, models: dict[str, dict[str, Any]] | None = None) -> None:
        if models is not None:
            self.models = models
        write_toml(self.config_path, self.config_dict())

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LLMUX_SIM_GPU_STATE"] = str(self.gpu_dir)
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        env.pop("NOTIFY_SOCKET", None)
        env.update(self.env_extra)
        return env

    def init_gpus(self) -> None:
        if (self.gpu_dir / "gpus.json").exists():
            return
        subprocess.run([SIM_COMMAND, "gpus", "init", str(self.gpu_dir), "--count",
                        str(self.gpus), "--total-mib", str(self.gpu_mib)],
                       env=self.env(), check=True, timeout=60, capture_output=True)

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> DaemonProcess:
        self.init_gpus()
        self.write_config()
        args = [sys.executable, "-m", "llmuxd", "-c", str(self.config_path),
                "--log-level", self.log_level]
        if not self.frontend:
            args.append("--no-frontend")
        out = open(self.stdout_path, "ab")  # noqa: SIM115 (kept by the child)
        try:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env(), start_new_session=True)
        finally:
            out.close()
        self.seen_pids.add(self.proc.pid)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llmuxd exited with {self.proc.returncode} at start:\n"
                                   + self.output()[-4000:])
            try:
                status, body = self.request("GET", "/v1/health", timeout=5)
                if status == 200 and body.get("ready"):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("llmuxd did not answer /v1/health in time:\n"
                                   + self.output()[-4000:])
            time.sleep(0.1)

    def __enter__(self) -> DaemonProcess:
        try:
            return self.start()
        except BaseException:
            self.kill()
            raise

    def __exit__(self, *exc: Any) -> None:
        """SIGTERM (bounded), then kill whatever is left; never raises (cleanup only)."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.stop(timeout=30)
        finally:
            self.kill()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def descendants(self) -> list[psutil.Process]:
        """The daemon's live descendants (children, engine cores, guardian, gunicorn)."""
        try:
            procs = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen_pids.update(p.pid for p in procs)
        return procs

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for the exit code (the caller asserts on it)."""
        assert self.proc is not None
        self.descendants()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """Kill the daemon's group and anything it started that is still alive."""
        if self.proc is not None:
            self.descendants()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        for pid in list(self.seen_pids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for p in self._leftovers():
            with contextlib.suppress(psutil.Error):
                p.kill()

    def _leftovers(self) -> list[psutil.Process]:
        """Processes still running that carry this daemon's temp dir in their env/args."""
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid == os.getpid():
                    continue
                cmd = " ".join(p.info["cmdline"] or [])
                if str(self.tmp) in cmd:
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def alive_pids(self) -> list[int]:
        """pids seen as the daemon's descendants (and the daemon) that still run."""
        alive = []
        for pid in self.seen_pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                continue
        return sorted(alive)

    # -- talking ------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None,
                timeout: float = 120.0) -> tuple[int, Any]:
        """One request to the control socket; (status, JSON body)."""
        return unix_request(self.socket, method, path, body, timeout)

    def status(self, model: str | None = None) -> Any:
        path = "/v1/models/" + quote(model, safe="") if model else "/v1/status"
        status, body = self.request("GET", path)
        assert status == 200, body
        return body

    def wait_for(self, predicate: Any, timeout: float = 60.0, what: str = "condition") -> Any:
        """Poll ``predicate()`` until truthy (returns it) or fail with the daemon's log."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n"
                                     + self.output()[-3000:])
            time.sleep(0.05)

    def wait_state(self, model: str, state: str, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait_for(lambda: (lambda s: s if s["state"] == state else None)(
            self.status(model)), timeout, f"{model} to be {state}")

    def output(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """The daemon's JSON log lines whose ``event`` is ``event``."""
        found = []
        for line in self.output().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.get("event") == event:
                    found.append(rec)
        return found


@contextlib.contextmanager
def daemon(models: dict[str, dict[str, Any]], **kwargs: Any) -> Iterator[DaemonProcess]:
    """``with daemon({...}) as d:`` — the same as ``with DaemonProcess(...)``."""
    with DaemonProcess(models, **kwargs) as d:
        yield d
