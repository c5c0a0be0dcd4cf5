"""The simulated EngineCore: the child process that holds the (simulated) memory.

In real vLLM the API server forks an `EngineCore` process that owns the CUDA context,
so GPU memory shows up under the child's pid, not the server's. This module is that
child. It records its GPU usage in the shared state directory under its own pid,
really allocates the scaled-down host copy of the weights during an L1 sleep, and
dies with its parent (PR_SET_PDEATHSIG, stdin EOF, a parent-pid check) so nothing
is orphaned.

Protocol: one JSON object per line on stdin, one reply per line on stdout.
  {"op": "init"}                           -> allocate the full amount (start-up check)
  {"op": "set", "usage": {idx: mib}, "check": bool, "host": bool,
   "weights": bool, "kv": bool}          (the last two drive --sim-real-cuda)
  {"op": "exit"}
Replies: {"ok": true, "usage": {...}} or {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from vllmsim.gpustate import GpuState, InsufficientMemory

if TYPE_CHECKING:
    from vllmsim.realcuda import RealCuda

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the parent dies; also watch it ourselves."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(PR_SET_NAME, b"VLLM::EngineCor", 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def format_gib(mib: float) -> str:
    return f"{round(mib / 1024, 2)}"


class Core:
    """The memory this engine holds: GPU usage in the state dir, host bytes in RAM."""

    def __init__(self, cfg: dict[str, object]) -> None:
        state_dir = cfg.get("state_dir")
        self.state = GpuState(str(state_dir)) if state_dir else None
        self.gpus = [int(str(g)) for g in cfg.get("gpus", []) or []]  # type: ignore[attr-defined]
        self.full_mib = int(str(cfg.get("full_mib", 0)))
        self.util = float(str(cfg.get("util", 0.9)))
        self.host_bytes = int(str(cfg.get("host_bytes", 0)))
        self.host: bytearray | None = None
        self.pid = os.getpid()
        self.pgid = os.getpgid(0)
        self.real_cfg = cfg if cfg.get("real_cuda") else None
        self.real: RealCuda | None = None

    def _init_real(self) -> str | None:
        """--sim-real-cuda: take the share of the real GPU too; an error text on failure."""
        if self.real_cfg is None:
            return None
        from vllmsim.realcuda import RealCuda, RealCudaError  # imports torch

        cfg = self.real_cfg
        try:
            self.real = RealCuda(self.util, float(str(cfg.get("size_gib", 2))),
                                 int(str(cfg.get("tp", 1))), max(1, len(self.gpus)))
            self.real.init()
        except RealCudaError as e:
            return str(e)
        return None

    def _set_real(self, weights: bool, kv: bool) -> str | None:
        if self.real is None:
            return None
        from vllmsim.realcuda import RealCudaError

        try:
            self.real.set(weights, kv)
        except RealCudaError as e:
            return str(e)
        return None

    def init(self) -> dict[str, object]:
        error = self._init_real()
        if error is not None:
            return {"ok": False, "error": error}
        if self.state is None:
            return {"ok": True, "usage": {}}
        self.state.ensure()
        totals = {s.index: s.total_mib for s in self.state.snapshot()}
        for n, idx in enumerate(self.gpus):
            if idx not in totals:
                return {
                    "ok": False,
                    "error": f"RuntimeError: CUDA error: invalid device ordinal (cuda:{n}, "
                    f"physical GPU {idx} does not exist)",
                }
        want = {idx: int(self.util * totals[idx]) for idx in self.gpus}
        try:
            self.state.allocate(self.pid, self.pgid, want)
        except InsufficientMemory as e:
            n = self.gpus.index(e.index)
            return {
                "ok": False,
                "error": (
                    f"ValueError: Free memory on device cuda:{n} "
                    f"({format_gib(e.free_mib)}/{format_gib(e.total_mib)} GiB) on startup "
                    f"is less than desired GPU memory utilization "
                    f"({self.util}, {format_gib(e.wanted_mib)} GiB). Decrease GPU memory "
                    f"utilization or reduce GPU memory used by other processes."
                ),
            }
        return {"ok": True, "usage": {str(k): v for k, v in want.items()}}

    def set(self, usage: dict[str, int], check: bool, host: bool,
            real: tuple[bool, bool] = (True, True)) -> dict[str, object]:
        want = {int(k): int(v) for k, v in usage.items()}
        error = self._set_real(*real)
        if error is not None:
            return {"ok": False, "error": error}
        if self.state is not None:
            try:
                if check:
                    self.state.allocate(self.pid, self.pgid, want)
                else:
                    self.state.set_usage(self.pid, self.pgid, want)
            except InsufficientMemory as e:
                n = self.gpus.index(e.index) if e.index in self.gpus else e.index
                return {
                    "ok": False,
                    "error": (
                        f"CUDA out of memory. Tried to allocate "
                        f"{format_gib(e.wanted_mib - e.free_mib)} GiB. GPU {n} has a total "
                        f"capacity of {format_gib(e.total_mib)} GiB of which "
                        f"{format_gib(max(0, e.free_mib))} GiB is free."
                    ),
                }
        if host and self.host is None and self.host_bytes > 0:
            buf = bytearray(self.host_bytes)
            buf[:: 4096] = b"\x01" * len(range(0, self.host_bytes, 4096))  # touch every page
            self.host = buf
        elif not host:
            self.host = None
        return {"ok": True, "usage": {str(k): v for k, v in want.items()}}

    def release(self) -> None:
        if self.real is not None:
            self.real.release()
        if self.state is not None:
            self.state.clear(self.pid)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    die_with_parent(int(cfg["parent"]))
    # The API server decides when to stop; a group-wide SIGTERM must not kill us first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    core = Core(cfg)
    out = sys.stdout
    try:
        for line in sys.stdin:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            op = msg.get("op")
            if op == "init":
                reply = core.init()
                if not reply["ok"]:
                    print(f"(EngineCore pid={core.pid}) {reply['error']}", file=sys.stderr)
            elif op == "set":
                reply = core.set(
                    msg.get("usage", {}), bool(msg.get("check")), bool(msg.get("host")),
                    (bool(msg.get("weights", True)), bool(msg.get("kv", True))),
                )
            elif op == "exit":
                break
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()
    finally:
        core.release()


if __name__ == "__main__":
    main()
