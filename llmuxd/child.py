"""One ``vllm serve`` child: its command line, environment, process group and log.

Why a process group per child: vLLM runs an API server plus an EngineCore child
(and workers) in the same session, and the engine holds the GPU memory. Stopping
the leader alone can leave the engine behind, so every signal goes to the group,
and a stop only ends when no member of the group is left. The guardian
(:mod:`llmuxd.guardian`) covers the case where the daemon itself dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import signal
import stat
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import psutil

from llmuxd.config import Config, ModelConfig
from llmuxd.guardian import Guardian

_POLL = 0.05
# After SIGKILL the kernel frees a process quickly; this only bounds a wait that
# should never be needed (a process stuck in uninterruptible sleep, e.g. a driver).
_KILL_WAIT = 10.0


class SpawnError(OSError):
    """The child could not be started at all (missing binary, bad log dir)."""


_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


def log_file_name(model_name: str) -> str:
    """The file name of a model's log in ``log_dir``: safe, and distinct per model.

    Why not just ``<name>.log``: model names are Hugging Face ids (``Qwen/Qwen3-14B``)
    and may hold any character vLLM accepts. A plain name keeps ``<name>.log`` (the
    file an operator already knows); any other becomes a readable slug plus ``~`` and
    a hash of the exact name. ``~`` never occurs in a plain name, so a slug cannot
    collide with one, and two slugs only collide if their hashes do.
    """
    if _SAFE_NAME.fullmatch(model_name):
        return f"{model_name}.log"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).lstrip(".")[:100]
    digest = hashlib.sha256(model_name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{slug}~{digest}.log"


def build_command(config: Config, model: ModelConfig) -> list[str]:
    """The ``vllm serve`` command line for a model (the seed's, plus host and name)."""
    cmd = shlex.split(config.vllm_command)
    cmd += ["serve", model.model_path]
    if model.transport == "unix":
        cmd += ["--uds", model.socket_path]
    else:
        cmd += ["--host", "127.0.0.1", "--port", str(model.port)]
    if model.enable_sleep_mode:
        cmd.append("--enable-sleep-mode")
    cmd += [
        "--gpu-memory-utilization", _number(model.gpu_memory_utilization),
        "--tensor-parallel-size", str(model.tensor_parallel_size),
        "--dtype", model.dtype,
        "--served-model-name", model.name,
    ]
    cmd += list(model.extra_args)
    return cmd


def _number(value: float) -> str:
    """0.9 -> "0.9", 1.0 -> "1.0": what a user would have typed, never 0.90000001."""
    return repr(float(value))


def prepare_socket_dir(path: str | Path) -> None:
    """Make the children's socket directory: ours, mode 0700, no stale entries checked here.

    Why 0700 and owned by the daemon's user: the child runs with
    VLLM_SERVER_DEV_MODE=1 (``/sleep``, ``/collective_rpc``) and no auth, so the
    directory is what keeps every other local user (and any foreign process that
    would impersonate a child) away from it. A directory owned by someone else is
    refused rather than taken over.
    """
    folder = Path(path)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise SpawnError(f"child socket dir {folder} is not a directory")
        if st.st_uid != os.geteuid():
            raise SpawnError(f"child socket dir {folder} is owned by uid {st.st_uid}, "
                             f"not by llmuxd's uid {os.geteuid()}")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(folder, 0o700)
    except OSError as exc:
        if isinstance(exc, SpawnError):
            raise
        raise SpawnError(f"cannot prepare child socket dir {folder}: "
                         f"{exc.strerror or exc}") from exc


def remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a killed child (vLLM cannot bind over it)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


def listener_pids(model: ModelConfig, pids: list[int]) -> list[int]:
    """Those of ``pids`` that hold the model's listening socket (its path or its port).

    Before a child is marked healthy, the server that answered must be ours: with
    TCP a foreign server already on the port answers ``/health`` while our child
    failed to bind (issue 12).
    """
    owners = []
    for pid in pids:
        try:
            if model.transport == "unix":
                conns = psutil.Process(pid).net_connections(kind="unix")
                if any(c.laddr == model.socket_path for c in conns):
                    owners.append(pid)
            else:
                conns = psutil.Process(pid).net_connections(kind="inet")
                if any(c.status == psutil.CONN_LISTEN and c.laddr
                       and c.laddr.port == model.port for c in conns):
                    owners.append(pid)
        except psutil.Error:
            continue
    return owners


def build_env(config: Config, model: ModelConfig,
              base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: dev mode on (sleep endpoints), its GPUs, then model.env."""
    env = dict(os.environ if base_env is None else base_env)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    env["NO_COLOR"] = "1"
    # NVML numbers GPUs by PCI bus id; CUDA's default order may differ. Make the
    # indices in CUDA_VISIBLE_DEVICES mean what the GPU probe reports.
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in model.gpu_indices)
    if config.daemon.sim_gpu_state:
        env["LLMUX_SIM_GPU_STATE"] = config.daemon.sim_gpu_state
    env.update(model.env)
    return env


def pids_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is ``pgid``."""
    # getpgid() first (one syscall per pid), /proc/<pid>/stat only for the group's own
    # pids: reading every process's status made this 15x slower, and it runs inside
    # every switch (sleep verify, wake preflight) — bench P4.
    found = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) != pgid or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                continue
        except (ProcessLookupError, psutil.Error):
            continue
        found.append(pid)
    return sorted(found)


class ChildProcess:
    """A spawned child in its own process group, with its output in a log file."""

    def __init__(self, proc: subprocess.Popen[bytes], model_name: str, log_path: Path,
                 command: list[str], guardian: Guardian | None) -> None:
        self._proc = proc
        self.pid: int = proc.pid
        self.pgid: int = proc.pid  # start_new_session: the child leads its own group
        self.model_name = model_name
        self.log_path = log_path
        self.command = command
        self.started_at = time.time()
        self._guardian = guardian
        self._registered = guardian is not None
        self._lock = threading.Lock()
        self._kill_now = threading.Event()
        self._reader: threading.Thread | None = None

    # -- start ---------------------------------------------------------------

    @classmethod
    def spawn(cls, config: Config, model: ModelConfig, log_dir: Path,
              on_line: Callable[[str], None] | None = None,
              guardian: Guardian | None = None,
              base_env: Mapping[str, str] | None = None) -> ChildProcess:
        """Start ``vllm serve`` for ``model``; safe to call from any thread.

        stdin is /dev/null; stdout and stderr go to ``<log_dir>/<model>.log``
        (appended, one header line per start). With ``on_line`` a reader thread
        also hands every line to it (``vllm_logging``).
        """
        command = build_command(config, model)
        env = build_env(config, model, base_env)
        if model.transport == "unix":
            prepare_socket_dir(Path(model.socket_path).parent)
            remove_stale_socket(model.socket_path)
        return cls.spawn_command(command, env, model.name, Path(log_dir), on_line, guardian)

    @classmethod
    def spawn_command(cls, command: list[str], env: Mapping[str, str], model_name: str,
                      log_dir: Path, on_line: Callable[[str], None] | None = None,
                      guardian: Guardian | None = None) -> ChildProcess:
        """Spawn any command the way a vLLM child is spawned (tests, stand-ins)."""
        log_path = Path(log_dir) / log_file_name(model_name)
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "ab", buffering=0)  # noqa: SIM115 (handed to the child)
        except OSError as exc:
            raise SpawnError(f"cannot open log file {log_path}: {exc.strerror or exc}") from exc
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        shown = shlex.join(command).replace("\r", "\\r").replace("\n", "\\n")  # one line
        # A full disk loses log lines, never the model (R2 "disk full for the logs").
        with contextlib.suppress(OSError):
            log.write(f"=== llmux {stamp} start: {shown}\n".encode())
        try:
            proc = subprocess.Popen(
                command, env=dict(env), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if on_line else log, stderr=subprocess.STDOUT,
                close_fds=True, start_new_session=True,
            )
        except OSError as exc:
            with contextlib.suppress(OSError):
                log.write(f"=== llmux: cannot start: {exc}\n".encode())
            log.close()
            raise SpawnError(f"cannot start {command[0]!r}: {exc.strerror or exc}") from exc
        child = cls(proc, model_name, log_path, command, guardian)
        if guardian is not None:
            try:
                guardian.register(child.pgid)
            except Exception:
                child.kill()
                log.close()
                raise
        if on_line is not None:
            assert proc.stdout is not None
            child._reader = threading.Thread(
                target=_copy_lines, args=(proc.stdout, log, on_line),
                name=f"child-log-{model_name}", daemon=True)
            child._reader.start()
        else:
            log.close()  # the child holds its own copy of the descriptor
        return child

    # -- state ---------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def poll(self) -> int | None:
        """Reap the leader if it exited; its exit status (negative = signal) or None."""
        return self._proc.poll()

    def is_alive(self) -> bool:
        return self._proc.poll() is None

    def wait(self, timeout: float | None) -> int | None:
        """Wait for the leader to exit (and reap it); None when still running."""
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def group_pids(self) -> list[int]:
        """Every live pid in the child's process group (leader, engine, workers)."""
        return pids_in_group(self.pgid)

    def serves(self, model: ModelConfig) -> str:
        """"" when a process of this child holds the model's listener, else why not."""
        if listener_pids(model, self.group_pids()):
            return ""
        where = model.socket_path if model.transport == "unix" else f"port {model.port}"
        return (f"the server answering on {where} is not our child (pid {self.pid}): "
                "another process holds it")

    # -- stop ----------------------------------------------------------------

    def stop(self, grace: float) -> int:
        """SIGTERM the group, wait up to ``grace``, SIGKILL what is left, reap.

        Returns the leader's exit status. Idempotent, and also ends group members
        that outlive the leader (an engine that ignored its parent's death).
        """
        with self._lock:
            if self._group_gone():
                return self._finish()
            self._signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and not self._kill_now.is_set():
                if self._group_gone():
                    return self._finish()
                time.sleep(_POLL)
            return self._kill_locked()

    def kill(self) -> int:
        """SIGKILL the whole group now, reap the leader, wait for the group to go.

        Also cuts short a stop() running in another thread (its grace ends at once).
        """
        self._kill_now.set()
        with self._lock:
            return self._kill_locked()

    def _kill_locked(self) -> int:
        deadline = time.monotonic() + _KILL_WAIT
        while True:
            self._signal(signal.SIGKILL)
            if self._group_gone() or time.monotonic() >= deadline:
                break
            time.sleep(_POLL)
        return self._finish()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def _group_gone(self) -> bool:
        self._proc.poll()  # reap a dead leader: a zombie still counts for killpg()
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        # Members exist; zombies among them (orphans not yet reaped by init) hold
        # nothing and cannot be killed, so they do not count.
        return not self.group_pids()

    def _finish(self) -> int:
        try:
            code = self._proc.wait(timeout=_KILL_WAIT)
        except subprocess.TimeoutExpired:  # stuck in the kernel; poll() reaps it later
            code = -signal.SIGKILL
        if self._reader is not None:
            self._reader.join(timeout=_KILL_WAIT)
        if self._registered and self._guardian is not None:
            self._registered = False
            with contextlib.suppress(Exception):
                self._guardian.unregister(self.pgid)
        return code

    # -- log -----------------------------------------------------------------

    def tail(self, n: int) -> list[str]:
        """The last ``n`` lines of the child's log file (all starts, newest last)."""
        return tail_file(self.log_path, n)

    def __repr__(self) -> str:
        return (f"ChildProcess(model={self.model_name!r}, pid={self.pid}, "
                f"returncode={self._proc.returncode})")


def tail_file(path: Path, n: int, max_bytes: int = 1 << 20) -> list[str]:
    """The last ``n`` lines of a file, reading at most ``max_bytes`` from its end."""
    if n <= 0:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return []
    lines: deque[str] = deque(maxlen=n)
    for line in data.decode("utf-8", "replace").splitlines():
        lines.append(line)
    return list(lines)


def _copy_lines(stream: IO[bytes], log: IO[bytes],
                on_line: Callable[[str], None]) -> None:
    """Reader thread: child output → log file and ``on_line`` (never raises)."""
    try:
        for raw in iter(stream.readline, b""):
            with contextlib.suppress(OSError):
                log.write(raw)
            with contextlib.suppress(Exception):
                on_line(raw.decode("utf-8", "replace").rstrip("\r\n"))
    finally:
        stream.close()
        log.close()
