"""Simulated GPUs: a shared directory that stands in for NVML.

Several `llmux-sim-vllm` processes (and the daemon's probe) share one directory, so
memory held by one simulated server is visible to the others and to llmuxd, exactly
as real GPU memory is. Layout (docs/interfaces.md section 3):

* ``gpus.json``: ``{"gpus": [{"index": 0, "total_mib": 81920, "name": "..."}]}``
* ``procs/<pid>.json``: ``{"pid": P, "pgid": G, "usage_mib": {"0": 73728}}``
* ``lock``: ``fcntl.flock`` taken around every check-and-set.

Entries of dead processes are ignored (and swept) so a SIGKILLed server frees its
memory, like a CUDA context dying with its process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_GPU_COUNT = 1
DEFAULT_GPU_MIB = 81920
DEFAULT_GPU_NAME = "Simulated H100 80GB"


@dataclass(frozen=True)
class GpuSnapshot:
    """One simulated GPU right now."""

    index: int
    total_mib: int
    used_mib: int
    name: str


class InsufficientMemory(Exception):
    """Raised by `allocate` when a GPU has less free memory than asked for."""

    def __init__(self, index: int, free_mib: int, total_mib: int, wanted_mib: int) -> None:
        self.index = index
        self.free_mib = free_mib
        self.total_mib = total_mib
        self.wanted_mib = wanted_mib
        super().__init__(
            f"GPU {index}: {free_mib} MiB free of {total_mib} MiB, {wanted_mib} MiB wanted"
        )


def pid_alive(pid: int) -> bool:
    """True when `pid` exists and is not a zombie (zombies hold no GPU memory)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"
    except (OSError, ValueError):
        return True


class GpuState:
    """Reader and writer of one simulated-GPU directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.procs = self.dir / "procs"

    # -- setup -------------------------------------------------------------------------

    def init(
        self, count: int, total_mib: int, name: str = DEFAULT_GPU_NAME, *, force: bool = True
    ) -> None:
        """Write gpus.json for `count` GPUs of `total_mib` each (keeps procs/)."""
        if count < 1 or total_mib < 1:
            raise ValueError("count and total_mib must be positive")
        self.procs.mkdir(parents=True, exist_ok=True)
        with self._locked():
            path = self.dir / "gpus.json"
            if path.exists() and not force:
                return
            gpus = [{"index": i, "total_mib": total_mib, "name": name} for i in range(count)]
            _atomic_write(path, {"gpus": gpus})

    def ensure(self) -> None:
        """Create the directory with defaults from env when nobody has initialised it."""
        if (self.dir / "gpus.json").exists():
            self.procs.mkdir(parents=True, exist_ok=True)
            return
        count = int(os.environ.get("LLMUX_SIM_GPUS", DEFAULT_GPU_COUNT))
        mib = int(os.environ.get("LLMUX_SIM_GPU_MIB", DEFAULT_GPU_MIB))
        self.init(count, mib, force=False)

    # -- reading -----------------------------------------------------------------------

    def gpus(self) -> list[dict[str, object]]:
        """The GPU table from gpus.json ([] when the directory is not initialised)."""
        try:
            data = json.loads((self.dir / "gpus.json").read_text())
        except FileNotFoundError:
            return []
        return list(data.get("gpus", []))

    def usage_by_pid(self) -> dict[int, dict[int, int]]:
        """pid -> {gpu index -> MiB} for every live process with an entry."""
        out: dict[int, dict[int, int]] = {}
        for pid, entry in self._entries():
            usage = entry.get("usage_mib")
            if isinstance(usage, dict):
                out[pid] = {int(k): int(v) for k, v in usage.items()}
        return out

    def entries(self) -> dict[int, dict[str, object]]:
        """pid -> the raw entry (pid, pgid, usage_mib) for every live process."""
        return dict(self._entries())

    def snapshot(self) -> list[GpuSnapshot]:
        """Every GPU with the memory the live processes hold on it."""
        used: dict[int, int] = {}
        for usage in self.usage_by_pid().values():
            for idx, mib in usage.items():
                used[idx] = used.get(idx, 0) + mib
        return [
            GpuSnapshot(
                index=int(str(g["index"])),
                total_mib=int(str(g["total_mib"])),
                used_mib=used.get(int(str(g["index"])), 0),
                name=str(g.get("name", DEFAULT_GPU_NAME)),
            )
            for g in self.gpus()
        ]

    # -- writing -----------------------------------------------------------------------

    def set_usage(self, pid: int, pgid: int, usage_mib: Mapping[int, int]) -> None:
        """Record what `pid` holds now (no capacity check: use `allocate` for that)."""
        with self._locked():
            self._write_entry(pid, pgid, usage_mib)

    def allocate(self, pid: int, pgid: int, usage_mib: Mapping[int, int]) -> None:
        """Check-and-set: make `pid` hold `usage_mib`, or raise InsufficientMemory.

        The check counts what every other live process holds plus what `pid` holds
        now, so growing from a sleep residue to the full amount needs only the delta.
        """
        with self._locked():
            totals = {int(str(g["index"])): int(str(g["total_mib"])) for g in self.gpus()}
            used: dict[int, int] = {}
            for other, usage in self.usage_by_pid().items():
                if other == pid:
                    continue
                for idx, mib in usage.items():
                    used[idx] = used.get(idx, 0) + mib
            for idx, want in sorted(usage_mib.items()):
                if idx not in totals:
                    raise InsufficientMemory(idx, 0, 0, want)
                free = totals[idx] - used.get(idx, 0)
                if want > free:
                    raise InsufficientMemory(idx, free, totals[idx], want)
            self._write_entry(pid, pgid, usage_mib)

    def free_mib(self, index: int, *, excluding_pid: int | None = None) -> int:
        """Free memory on GPU `index`, not counting `excluding_pid`'s own share."""
        total = 0
        for g in self.gpus():
            if int(str(g["index"])) == index:
                total = int(str(g["total_mib"]))
        used = sum(
            usage.get(index, 0)
            for pid, usage in self.usage_by_pid().items()
            if pid != excluding_pid
        )
        return total - used

    def clear(self, pid: int) -> None:
        """Forget `pid`'s entry (its memory is free again)."""
        with contextlib.suppress(FileNotFoundError):
            (self.procs / f"{pid}.json").unlink()

    # -- internals ---------------------------------------------------------------------

    def _write_entry(self, pid: int, pgid: int, usage_mib: Mapping[int, int]) -> None:
        self.procs.mkdir(parents=True, exist_ok=True)
        entry = {
            "pid": pid,
            "pgid": pgid,
            "usage_mib": {str(k): int(v) for k, v in sorted(usage_mib.items())},
        }
        _atomic_write(self.procs / f"{pid}.json", entry)

    def _entries(self) -> Iterator[tuple[int, dict[str, object]]]:
        try:
            names = os.listdir(self.procs)
        except FileNotFoundError:
            return
        for name in names:
            if not name.endswith(".json"):
                continue
            path = self.procs / name
            try:
                entry = json.loads(path.read_text())
                pid = int(entry["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not pid_alive(pid) or not _same_group(pid, entry.get("pgid")):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            yield pid, entry

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _same_group(pid: int, pgid: object) -> bool:
    """Guard against pid reuse: the live pid must still be in the recorded group."""
    if not isinstance(pgid, int):
        return True
    try:
        return os.getpgid(pid) == pgid
    except OSError:
        return False


def _atomic_write(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
