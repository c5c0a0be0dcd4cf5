"""The simulated engine as the API server sees it: sleep state, memory, requests.

One `Engine` per server. It owns the sleep/wake state machine (with vLLM 0.32's
semantics, VLLM_API.md), the requests in flight, the timing of every operation,
and the `EngineCoreClient` that makes the child process hold the memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from vllmsim.errors import internal_error
from vllmsim.faults import Faults
from vllmsim.metrics import SimMetrics
from vllmsim.options import SimOptions

log = logging.getLogger("llmux.sim")

RELOAD_FAIL_TEXT = (
    "Call to collective_rpc method failed: default_weight_loader() got an unexpected "
    "keyword argument 'weight_name'"
)


class EngineDead(Exception):
    """The engine core child is gone."""


class EngineCoreClient:
    """Starts the engine child and talks to it over its stdin/stdout."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self.expected_exit = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self, cfg: dict[str, object]) -> None:
        cfg = {**cfg, "parent": os.getpid()}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vllmsim.enginecore", json.dumps(cfg),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )

    async def call(self, msg: dict[str, object]) -> dict[str, object]:
        assert self.proc and self.proc.stdin and self.proc.stdout
        async with self._lock:
            try:
                self.proc.stdin.write((json.dumps(msg) + "\n").encode())
                await self.proc.stdin.drain()
                line = await self.proc.stdout.readline()
            except (ConnectionError, BrokenPipeError) as e:
                raise EngineDead(str(e)) from None
            if not line:
                raise EngineDead("engine core closed its pipe")
            reply: dict[str, object] = json.loads(line)
            return reply

    async def stop(self) -> None:
        """Ask the child to release its memory and exit; reap it."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.expected_exit = True
        try:
            assert self.proc.stdin
            self.proc.stdin.write(b'{"op": "exit"}\n')
            await self.proc.stdin.drain()
            self.proc.stdin.close()
            await asyncio.wait_for(self.proc.wait(), 5.0)
        except (ConnectionError, BrokenPipeError, TimeoutError):
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


@dataclass(eq=False)
class Handle:
    """One request in the engine (running, i.e. admitted and generating)."""

    aborted: bool = False


class Engine:
    """Sleep/wake state machine plus request admission, pacing and abort."""

    def __init__(self, opts: SimOptions, gpus: list[int], metrics: SimMetrics) -> None:
        self.opts = opts
        self.timing = opts.timing
        self.faults: Faults = opts.faults
        self.metrics = metrics
        self.gpus = gpus
        self.core = EngineCoreClient()
        self.total_mib: dict[int, int] = {}
        # logical state (what the API reports)
        self.weights_on = True
        self.kv_on = True
        self.paused = False  # level-0 sleep
        self.sleeping = False
        self.level: int | None = None
        self.weights_valid = True
        # memory state (what the GPU holds; differs without --enable-sleep-mode)
        self.mem_weights = True
        self.mem_kv = True
        self.host_weights = False
        self.dead = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.hold_running = False
        self.running: set[Handle] = set()
        self.parked = 0
        self.parked_total = 0   # requests that arrived while asleep (ever): a proxy bug
        self.shutting_down = False
        self.op_lock = asyncio.Lock()
        self.requests_served = 0
        self.on_death: Callable[[], None] | None = None

    # -- memory ------------------------------------------------------------------------

    def _full_mib(self, idx: int) -> int:
        return int(self.opts.gpu_memory_utilization * self.total_mib.get(idx, 0))

    def _weights_mib(self, idx: int) -> int:
        full = self._full_mib(idx)
        per_gpu = int(self.timing.size_gib * 1024 / max(1, self.opts.tensor_parallel_size))
        return max(0, min(per_gpu, full - self.opts.residue_mib))

    def usage(self, weights: bool, kv: bool) -> dict[str, int]:
        out = {}
        for idx in self.gpus:
            full = self._full_mib(idx)
            residue = min(self.opts.residue_mib, full)
            w = self._weights_mib(idx)
            kv_mib = max(0, full - residue - w)
            out[str(idx)] = residue + (w if weights else 0) + (kv_mib if kv else 0)
        return out

    async def start_core(self) -> str | None:
        """Start the child and allocate the start-up memory; an error text on failure."""
        if self.opts.gpu_state:
            from vllmsim.gpustate import GpuState

            state = GpuState(self.opts.gpu_state)
            state.ensure()
            self.total_mib = {s.index: s.total_mib for s in state.snapshot()}
        await self.core.start({
            "state_dir": self.opts.gpu_state or None,
            "gpus": self.gpus,
            "util": self.opts.gpu_memory_utilization,
            "host_bytes": int(self.timing.size_gib * (1 << 30) * self.opts.host_ram_factor),
            "real_cuda": self.opts.real_cuda,
            "size_gib": self.timing.size_gib,
            "tp": self.opts.tensor_parallel_size,
        })
        reply = await self.core.call({"op": "init"})
        if not reply.get("ok"):
            return str(reply.get("error"))
        asyncio.get_running_loop().create_task(self._watch_core())
        return None

    async def _watch_core(self) -> None:
        assert self.core.proc
        await self.core.proc.wait()
        if not self.core.expected_exit:
            self.dead = True
            log.error("EngineCore (pid %s) died unexpectedly", self.core.pid)
            if self.on_death:
                self.on_death()

    async def _set_memory(self, weights: bool, kv: bool, host: bool, check: bool) -> None:
        if self.dead:
            raise internal_error("EngineCore encountered an issue. See stack trace.")
        try:
            reply = await self.core.call(
                {"op": "set", "usage": self.usage(weights, kv), "check": check, "host": host,
                 "weights": weights, "kv": kv}
            )
        except EngineDead:
            raise internal_error("EngineCore encountered an issue.") from None
        if not reply.get("ok"):
            raise internal_error(str(reply.get("error")))
        self.mem_weights, self.mem_kv, self.host_weights = weights, kv, host

    # -- state -------------------------------------------------------------------------

    @property
    def is_sleeping(self) -> bool:
        return self.sleeping

    def sleep_state_metric(self) -> dict[str, int]:
        return {
            "awake": 0 if self.sleeping else 1,
            "weights_offloaded": 1 if self.sleeping and self.level == 1 else 0,
            "discard_all": 1 if self.sleeping and self.level == 2 else 0,
        }

    async def sleep(self, level: int, mode: str) -> None:
        """POST /sleep: pause, deal with in-flight requests, release memory."""
        started = time.perf_counter()
        self.metrics.op_started("sleep")
        try:
            async with self.op_lock:
                if "sleep_500" in self.faults:
                    raise internal_error("Simulated fault sleep_500: sleep failed")
                if "sleep_hang" in self.faults:
                    log.warning("fault sleep_hang: this /sleep never returns")
                    await asyncio.Event().wait()
                self.gate.clear()
                try:
                    await self._quiesce_and_release(level, mode)
                except BaseException:
                    if not self.sleeping:  # failed: serve again rather than park forever
                        self.hold_running = False
                        self.gate.set()
                    raise
                self.sleeping = True
                self.level = level if level else (self.level or 0)
                log.info("engine asleep (level %d, mode %s)", level, mode)
        finally:
            self.metrics.op_finished("sleep", time.perf_counter() - started)

    async def _quiesce_and_release(self, level: int, mode: str) -> None:
        """Deal with in-flight requests, then release the memory the level frees."""
        if mode == "abort":
            for h in self.running:
                h.aborted = True
            await self._until(lambda: not self.running)
        elif mode == "wait":
            await self._until(lambda: not self.running)
        else:  # keep: in-flight requests pause and resume after wake
            self.hold_running = True
        if level == 0:
            self.paused = True
        else:
            release = self.opts.enable_sleep_mode and "sleep_no_free" not in self.faults
            offload = self.weights_on and self.weights_valid
            if release and self.mem_weights:
                await asyncio.sleep(self.timing.sleep_s(level))
            if self.opts.enable_sleep_mode and level == 2:
                self.weights_valid = False
            if release:
                await self._set_memory(False, False, host=level == 1 and offload,
                                       check=False)
            self.weights_on = self.kv_on = False

    async def wake(self, tags: list[str] | None) -> bool:
        """POST /wake_up: bring back weights and/or KV cache; True when fully awake."""
        started = time.perf_counter()
        self.metrics.op_started("wake")
        try:
            async with self.op_lock:
                if "wake_500" in self.faults:
                    raise internal_error("Simulated fault wake_500: wake_up failed")
                want_w = tags is None or "weights" in tags
                want_kv = tags is None or "kv_cache" in tags
                need_w = want_w and not self.weights_on
                need_kv = want_kv and not self.kv_on
                was_w, from_host = self.mem_weights, self.host_weights
                target_w = self.mem_weights or need_w
                target_kv = self.mem_kv or need_kv
                if (target_w, target_kv) != (self.mem_weights, self.mem_kv):
                    # allocate everything asked for at once: a wake that does not fit
                    # fails as a whole (CUDA OOM), leaving the engine asleep
                    await self._set_memory(target_w, target_kv, host=from_host, check=True)
                if need_w:
                    if not was_w:
                        await asyncio.sleep(self.timing.wake_s(1 if from_host else 2))
                        if from_host:
                            await self._set_memory(True, self.mem_kv, host=False, check=False)
                    self.weights_on = True
                if need_kv:
                    self.kv_on = True
                fully = self.weights_on and self.kv_on
                if fully:
                    self.paused = False
                    self.sleeping = False
                    self.level = None
                    self.hold_running = False
                    self.gate.set()
                    log.info("engine awake")
                return fully
        finally:
            self.metrics.op_finished("wake", time.perf_counter() - started)

    async def reload_weights(self) -> list[None]:
        """collective_rpc reload_weights: read the weights from disk again."""
        async with self.op_lock:
            if "reload_fail" in self.faults:
                raise internal_error(RELOAD_FAIL_TEXT)
            await asyncio.sleep(self.timing.reload_s())
            self.weights_valid = True
            return [None] * max(1, self.opts.tensor_parallel_size)

    async def _until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            await asyncio.sleep(0.005)

    # -- requests ----------------------------------------------------------------------

    async def admit(self, client_gone: Callable[[], bool]) -> Handle | None:
        """Wait (parked) while the engine sleeps; None when the client left meanwhile."""
        if not self.gate.is_set():
            self.parked += 1
            self.parked_total += 1
            try:
                while not self.gate.is_set():
                    if client_gone():
                        return None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.gate.wait(), 0.2)
            finally:
                self.parked -= 1
        if self.shutting_down:
            return None
        h = Handle()
        self.running.add(h)
        return h

    def release(self, h: Handle) -> None:
        self.running.discard(h)

    async def pace(self, h: Handle, deadline: float) -> bool:
        """Wait for the next token's time; False when the request was aborted."""
        loop = asyncio.get_running_loop()
        delay = deadline - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if h.aborted:
            return False
        while self.hold_running and not self.gate.is_set() and not h.aborted:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.gate.wait(), 0.05)
        return not h.aborted

    def abort_all(self) -> None:
        for h in self.running:
            h.aborted = True

    def kv_usage(self) -> float:
        return min(1.0, len(self.running) / 256)
