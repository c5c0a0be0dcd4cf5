"""Opt-in real GPU memory for the simulator's engine child (`--sim-real-cuda`).

Why: the simulated GPU state directory proves llmuxd's logic, but only real memory read
through NVML proves that its sleep verification works against what the driver reports.
In this mode the engine child really allocates its share of each visible GPU with torch,
frees it on an L1/L2 sleep (the CUDA context stays, as vLLM's does: that is the
realistic residue) and allocates it again on wake. The `sleep_no_free` fault keeps it,
because the engine then never asks to free anything.

torch is imported lazily, inside this class, so nothing else in the simulator (or its
tests, or llmuxd) ever needs it; the mode is off unless asked for.
"""

from __future__ import annotations

from typing import Any

_GIB = 1 << 30
_MIB = 1 << 20
# Left out of util x total: the CUDA context this process already holds counts in
# vLLM's budget too, so the tensors take a little less than the whole share.
CONTEXT_ALLOWANCE = 512 * _MIB


class RealCudaError(Exception):
    """An allocation failed; the text reads like vLLM's / PyTorch's own."""


class RealCuda:
    """The engine's real tensors, one weights and one KV-cache block per visible GPU."""

    def __init__(self, util: float, size_gib: float, tp: int, devices: int) -> None:
        import torch  # lazy: only this mode needs it

        self._torch: Any = torch
        self.util = util
        self.devices = max(1, devices)
        self.size_bytes = int(size_gib * _GIB / max(1, tp))
        self.weights: list[Any] = []
        self.kv: list[Any] = []
        self.share: list[int] = []

    def init(self) -> None:
        """Create the context and allocate util x total on each GPU (vLLM's start check)."""
        torch = self._torch
        if not torch.cuda.is_available():
            raise RealCudaError("RuntimeError: --sim-real-cuda needs a CUDA GPU; torch sees none")
        torch.cuda.init()
        for n in range(self.devices):
            free, total = torch.cuda.mem_get_info(n)
            want = int(self.util * total)
            if want > free:
                raise RealCudaError(
                    f"ValueError: Free memory on device cuda:{n} "
                    f"({round(free / _GIB, 2)}/{round(total / _GIB, 2)} GiB) on startup is "
                    f"less than desired GPU memory utilization ({self.util}, "
                    f"{round(want / _GIB, 2)} GiB). Decrease GPU memory utilization or "
                    f"reduce GPU memory used by other processes.")
            self.share.append(max(0, want - CONTEXT_ALLOWANCE))
        self.weights = [None] * self.devices
        self.kv = [None] * self.devices
        self.set(True, True)

    def _split(self, n: int) -> tuple[int, int]:
        weights = min(self.size_bytes, self.share[n])
        return weights, self.share[n] - weights

    def set(self, weights: bool, kv: bool) -> None:
        """Hold exactly the blocks asked for; a failed allocation raises (CUDA OOM text)."""
        torch = self._torch
        for n in range(self.devices):
            w_bytes, kv_bytes = self._split(n)
            for held, want, nbytes in ((self.weights, weights, w_bytes),
                                       (self.kv, kv, kv_bytes)):
                if not want and held[n] is not None:
                    held[n] = None
                elif want and held[n] is None and nbytes > 0:
                    try:
                        held[n] = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{n}")
                    except torch.cuda.OutOfMemoryError as exc:
                        self.free_cache()
                        raise RealCudaError(str(exc).splitlines()[0]) from None
        self.free_cache()

    def free_cache(self) -> None:
        """Give freed blocks back to the driver (NVML sees them go); the context stays."""
        self._torch.cuda.empty_cache()

    def held_mib(self) -> dict[str, int]:
        """MiB of tensors held per visible GPU (for /_sim/state-style diagnostics)."""
        out = {}
        for n in range(len(self.weights)):
            held = sum(int(t.numel()) for t in (self.weights[n], self.kv[n]) if t is not None)
            out[str(n)] = held // _MIB
        return out

    def release(self) -> None:
        self.weights = [None] * len(self.weights)
        self.kv = [None] * len(self.kv)
        self.free_cache()
