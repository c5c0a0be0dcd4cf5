"""Host RAM as the kernel reports it: /proc/meminfo and a child's process tree.

Why the process tree: a vLLM child is an API server plus an engine core (plus a
worker per GPU with tensor parallelism); a level-1 sleep copies the weights into
pinned host memory in the engine process, not in the one llmuxd started. The
simulator's engine core really allocates its (scaled) host copy, so llmuxd reads
simulated and real children the same way. Resident set size double-counts pages
shared between the processes of a tree (libraries), which errs on the safe side.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass

import psutil

MEMINFO = "/proc/meminfo"


@dataclass(frozen=True)
class HostMemory:
    """The whole box: total RAM and what the kernel could still hand out."""

    total: int
    available: int

    @property
    def used(self) -> int:
        return self.total - self.available


def read_meminfo(path: str = MEMINFO) -> HostMemory:
    """MemTotal and MemAvailable in bytes (OSError/ValueError if unreadable)."""
    values: dict[str, int] = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0]) * 1024     # kB
    return HostMemory(values["MemTotal"], values["MemAvailable"])


def tree_rss(pid: int) -> int | None:
    """Resident bytes of ``pid`` and all its descendants; None if it is gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def trees_rss(roots: list[int]) -> dict[int, int | None]:
    """``tree_rss`` of several roots from one pass over the process table (the sampler's
    way: one scan every few seconds, not one per model)."""
    children: dict[int, list[int]] = defaultdict(list)
    rss: dict[int, int] = {}
    for p in psutil.process_iter(["pid", "ppid", "memory_info"]):
        info = p.info
        children[info["ppid"] or 0].append(info["pid"])
        mem = info["memory_info"]
        rss[info["pid"]] = mem.rss if mem is not None else 0
    out: dict[int, int | None] = {}
    for root in roots:
        if root not in rss:
            out[root] = None
            continue
        total, stack, seen = 0, [root], set()
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            total += rss.get(pid, 0)
            stack.extend(children.get(pid, ()))
        out[root] = total
    return out
