"""A stand-in for torch, for CPU rehearsals of ``--sim-real-cuda`` (not a real torch).

Put ``tests/sim/faketorch`` first on PYTHONPATH: the simulator's engine child then runs
its real-CUDA code path against this bookkeeping instead of a GPU. One GPU of
``FAKE_TORCH_TOTAL_GIB`` (default 80); "free" counts this process's tensors and
``FAKE_TORCH_FOREIGN_GIB`` (another tenant, default 0). Every
allocation and release is appended to ``FAKE_TORCH_LOG`` (if set) as ``pid op bytes``,
so a test can see what the engine did.
"""

from __future__ import annotations

import os

uint8 = "uint8"
_GIB = 1 << 30
_held = 0


def _log(op: str, nbytes: int) -> None:
    path = os.environ.get("FAKE_TORCH_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {op} {nbytes}\n")


class _Tensor:
    def __init__(self, nbytes: int) -> None:
        global _held
        self._n = nbytes
        _held += nbytes
        _log("alloc", nbytes)

    def numel(self) -> int:
        return self._n

    def __del__(self) -> None:
        global _held
        _held -= self._n
        _log("free", self._n)


def empty(n: int, dtype: str = uint8, device: str = "cuda") -> _Tensor:
    total = int(float(os.environ.get("FAKE_TORCH_TOTAL_GIB", "80")) * _GIB)
    if n > total - _held:
        raise cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} bytes.")
    return _Tensor(n)


class cuda:  # mirrors torch.cuda
    class OutOfMemoryError(RuntimeError):
        pass

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def init() -> None:
        _log("init", 0)

    @staticmethod
    def mem_get_info(device: int = 0) -> tuple[int, int]:
        total = int(float(os.environ.get("FAKE_TORCH_TOTAL_GIB", "80")) * _GIB)
        foreign = int(float(os.environ.get("FAKE_TORCH_FOREIGN_GIB", "0")) * _GIB)
        return total - foreign - _held, total

    @staticmethod
    def empty_cache() -> None:
        pass


_log("import", 0)
