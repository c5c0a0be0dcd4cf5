"""Memory-aware sleeping: a host-RAM budget for level-1 sleepers, LRU sleepers first out.

A level-1 sleep copies a model's weights into host RAM (28 GB for a 14B model);
several L1 sleepers can run a box out of memory, and the OOM killer then picks a
victim we did not choose. So before an L1 sleep llmuxd checks the budget
(``daemon.host_memory_limit``): what llmux's model processes hold (the RSS of each
child's process tree, sampled) plus what this sleep will add must stay under the
limit. The limit is "auto" by default: whatever keeps 10 % of the box's RAM free
(``MemAvailable`` of /proc/meminfo); an explicit size or percentage can only make it
tighter, never push the box below that floor.

When the sleep would not fit (``plan_l1_sleep``, pure): stop level-1 sleepers that
were used less recently than this model, least recently used first, if that frees
enough; otherwise sleep this model at level 2 instead (its weights are dropped,
not copied; the next wake reloads them from disk). What a sleep will add is what
this model's last L1 sleep took (measured: tree RSS before and after), else the
size of its weight files on disk (a local directory or the Hugging Face cache),
else unknown: the sleep goes ahead, is measured, and if the box is then over the
budget the LRU level-1 sleepers are stopped (``over_budget``).

GPU residue (every sleeper keeps ~1.3 GiB of CUDA context per GPU) is the
planner's ``make_room``: when a wake or start does not fit, it stops the least
recently used sleeper first (``lru_key``), one at a time, and tries again.

Every decision is logged (``host_memory``), kept in ``/v1/status`` (``memory``) and
counted in ``llmux_memory_actions_total``.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import Counter, Gauge

from llmuxd.config import ModelConfig, parse_memory_limit
from llmuxd.core import Core
from llmuxd.hostmem import HostMemory, read_meminfo, trees_rss
from llmuxd.model import ModelRuntime
from llmuxd.states import ModelState
from llmuxd.switching import Switcher

log = structlog.get_logger("llmuxd.supervisor")
S = ModelState

FREE_FLOOR = 0.10          # "auto": leave 10 % of the box's RAM free
SAMPLE_EVERY = 2.0
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


# ---------------------------------------------------------------------------
# Pure rules


def resolve_limit(spec: str, models_bytes: int, host: HostMemory) -> tuple[int, str]:
    """The budget for llmux's model processes in bytes, and how it was reached.

    "auto" = what they hold now + what the box has available - 10 % of its RAM;
    an explicit limit (bytes or a percentage of RAM) is capped by that.
    """
    auto = int(models_bytes + host.available - FREE_FLOOR * host.total)
    kind, value = parse_memory_limit(spec)
    if kind == "auto":
        return auto, "auto: leave 10% of RAM free"
    explicit = int(value if kind == "bytes" else value / 100 * host.total)
    if explicit <= auto:
        return explicit, f"host_memory_limit = {spec}"
    return auto, f"host_memory_limit = {spec}, capped to leave 10% of RAM free"


def lru_key(last_used: float | None, since: float) -> tuple[float, float]:
    """Sort key, least recently used first: never used < used long ago < used lately."""
    return (float("-inf") if last_used is None else last_used, since)


@dataclass(frozen=True)
class SleeperFacts:
    """A sleeping model that could be stopped to free host RAM."""

    name: str
    level: int
    host_bytes: int
    last_used: float | None
    since: float
    wanted: bool                  # requests or demands wait for it: never stopped for this


@dataclass(frozen=True)
class L1Plan:
    level: int                    # 1, or 2 when the L1 copy does not fit
    stop: tuple[str, ...]         # L1 sleepers to stop first (LRU first)
    why: str                      # empty when it simply fits


def plan_l1_sleep(model: str, expected: int, last_used: float | None, since: float,
                  held: int, limit: int, sleepers: list[SleeperFacts]) -> L1Plan:
    """Level-1 sleep of ``model`` (adds ``expected`` bytes to ``held``) under ``limit``."""
    if held + expected <= limit:
        return L1Plan(1, (), "")
    need = held + expected - limit
    mine = lru_key(last_used, since)
    stop: list[str] = []
    freed = 0
    for s in sorted(sleepers, key=lambda s: lru_key(s.last_used, s.since)):
        if freed >= need:
            break
        if s.level == 1 and not s.wanted and s.name != model \
                and lru_key(s.last_used, s.since) < mine:
            stop.append(s.name)
            freed += s.host_bytes
    numbers = (f"L1 copy of {_gib(expected)} over the host budget: models hold "
               f"{_gib(held)}, limit {_gib(limit)}")
    if freed >= need:
        return L1Plan(1, tuple(stop), f"{numbers}; stopping least recently used "
                                      f"sleeper(s) {', '.join(stop)}")
    return L1Plan(2, (), f"{numbers}; no older level-1 sleeper frees enough: "
                         "sleeping at level 2 instead")


def over_budget(held: int, limit: int, sleepers: list[SleeperFacts]) -> list[str]:
    """The LRU level-1 sleepers to stop so that ``held`` gets under ``limit``."""
    stop: list[str] = []
    for s in sorted(sleepers, key=lambda s: lru_key(s.last_used, s.since)):
        if held <= limit:
            break
        if s.level == 1 and not s.wanted:
            stop.append(s.name)
            held -= s.host_bytes
    return stop


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def weights_on_disk(mc: ModelConfig) -> int | None:
    """Bytes of the model's weight files: a local directory, or its Hugging Face cache."""
    path = mc.model_path
    dirs: list[str] = []
    if os.path.isdir(path):
        dirs = [path]
    elif path.count("/") == 1:
        env = {**os.environ, **mc.env}
        hub = env.get("HF_HUB_CACHE") or os.path.join(
            env.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub")
        snaps = sorted(glob.glob(os.path.join(hub, "models--" + path.replace("/", "--"),
                                              "snapshots", "*")), key=os.path.getmtime)
        dirs = snaps[-1:]
    total = 0
    for d in dirs:
        for pattern in WEIGHT_FILES:
            for f in glob.glob(os.path.join(d, "**", pattern), recursive=True):
                try:
                    total += os.path.getsize(f)     # follows the cache's symlinks
                except OSError:
                    continue
    return total or None


# ---------------------------------------------------------------------------
# The keeper (loop thread, plus one sampling thread)


class MemoryMetrics:
    """The host-memory series, on the daemon's registry."""

    def __init__(self, registry: Any) -> None:
        self.actions = Counter("llmux_memory_actions_total",
                               "Memory-aware sleeping decisions (demote_l2, stop_sleeper)",
                               ["action", "model"], registry=registry)
        self.model_bytes = Gauge("llmux_model_host_memory_bytes",
                                 "Host RAM of a model's process tree (RSS)", ["model"],
                                 registry=registry)
        self.limit = Gauge("llmux_host_memory_limit_bytes",
                           "Host RAM budget for the model processes", registry=registry)
        self.held = Gauge("llmux_host_memory_models_bytes",
                          "Host RAM the model processes hold together", registry=registry)
        self.available = Gauge("llmux_host_memory_available_bytes",
                               "MemAvailable of /proc/meminfo", registry=registry)


class HostMemoryKeeper:
    """Samples host RAM, chooses the level of each L1 sleep, learns what it took."""

    def __init__(self, core: Core, ops: Switcher,
                 read_host: Callable[[], HostMemory] = read_meminfo) -> None:
        self.core = core
        self.ops = ops
        self.read_host = read_host
        self.metrics = MemoryMetrics(core.metrics.registry)
        self.actions: deque[dict[str, Any]] = deque(maxlen=20)
        self.host: HostMemory | None = None
        self.limit: int | None = None
        self.limit_how = ""
        self.next_at = 0.0
        self.running = False
        self.sampled_at: float | None = None   # wall time the last applied sample began
        self._disk: dict[str, int | None] = {}

    # -- sampling --------------------------------------------------------------

    def maybe_sample(self, now: float) -> None:
        """Start a sample of every child's tree RSS when due (loop thread)."""
        if now < self.next_at or self.running:
            return
        self.running = True
        self.next_at = now + SAMPLE_EVERY
        pids = {n: m.child.pid for n, m in self.core.models.items() if m.child is not None}
        threading.Thread(target=self._sample, args=(pids, time.time()), name="host-sample",
                         daemon=True).start()

    def _sample(self, pids: dict[str, int], began: float) -> None:
        by_pid = trees_rss(list(pids.values())) if pids else {}
        sizes = {n: by_pid.get(pid) for n, pid in pids.items()}
        try:
            host: HostMemory | None = self.read_host()
        except (OSError, ValueError, KeyError):
            host = None
        self.core.post(lambda: self._apply(pids, sizes, host, began))

    def _apply(self, pids: dict[str, int], sizes: dict[str, int | None],
               host: HostMemory | None, began: float) -> None:
        self.running = False
        # When the figures were taken: a sample begun before a switch ended still shows
        # the memory as it was (a woken model's level-1 copy, for one).
        self.sampled_at = began
        for name, m in self.core.models.items():
            if m.child is None:
                m.host_memory_bytes = None
            elif pids.get(name) == m.child.pid:
                m.host_memory_bytes = sizes.get(name)
            if m.host_memory_bytes is not None:
                self.metrics.model_bytes.labels(name).set(m.host_memory_bytes)
        if host is not None:
            self.host = host
            self._budget()

    def _read_host(self) -> None:
        """A fresh /proc/meminfo before a decision (one small file; the last one if not)."""
        try:
            self.host = self.read_host()
        except (OSError, ValueError, KeyError) as exc:
            log.warning("meminfo_unreadable", error=str(exc))

    def _held(self) -> int:
        """What the model processes hold, those being stopped left out: their memory is
        on its way out, and counting it would stop more sleepers than needed."""
        return sum(m.host_memory_bytes or 0 for m in self.core.models.values()
                   if m.child is not None and m.state is not S.STOPPING)

    def _budget(self) -> int | None:
        if self.host is None:
            return None
        held = self._held()
        self.limit, self.limit_how = resolve_limit(self.core.config.daemon.host_memory_limit,
                                                   held, self.host)
        self.metrics.limit.set(self.limit)
        self.metrics.held.set(held)
        self.metrics.available.set(self.host.available)
        return self.limit

    # -- decisions ---------------------------------------------------------------

    def expected_l1(self, m: ModelRuntime) -> tuple[int | None, str]:
        """What an L1 sleep of m will add to host RAM, and where the figure comes from."""
        if m.l1_host is not None and m.l1_host[0] == m.config.model_path:
            return m.l1_host[1], "measured at its last level-1 sleep"
        path = m.config.model_path
        if path not in self._disk:
            self._disk[path] = weights_on_disk(m.config)
        size = self._disk[path]
        if size is not None:
            return size, "its weight files on disk"
        return None, "unknown until its first level-1 sleep"

    def _sleepers(self) -> list[SleeperFacts]:
        gates = self.core.leases.view()
        out = []
        for m in self.core.models.values():
            if m.state is not S.SLEEPING or m.busy or m.removed:
                continue
            gate = gates.get(m.name)
            out.append(SleeperFacts(m.name, m.sleep_level or 0, m.host_memory_bytes or 0,
                                    m.last_used, m.state_since_mono,
                                    bool(m.demands or (gate and gate.queued))))
        return out

    def choose_level(self, m: ModelRuntime, level: int) -> int:
        """The level m really sleeps at (loop thread, right before the sleep)."""
        if level != 1:
            return level
        self._read_host()
        limit = self._budget()
        expected, source = self.expected_l1(m)
        if limit is None or expected is None:
            return level
        plan = plan_l1_sleep(m.name, expected, m.last_used, m.state_since_mono,
                             self._held(), limit, self._sleepers())
        if not plan.why:
            return 1
        why = f"{plan.why} (expected size: {source}; {self.limit_how})"
        if plan.level == 2:
            self._record("demote_l2", m.name, why)
        for name in plan.stop:
            other = self.core.models[name]
            self._record("stop_sleeper", name, f"making room in host RAM for {m.name}: "
                                               + why)
            self.ops.stop_model(other, f"stopped to free host RAM for {m.name}'s "
                                       "level-1 sleep (least recently used)")
        return plan.level

    def slept(self, m: ModelRuntime, level: int, before: int | None,
              after: int | None) -> None:
        """m is asleep: learn what its L1 copy took; stop LRU sleepers if over budget."""
        if after is not None:
            m.host_memory_bytes = after
        if level != 1 or before is None or after is None:
            return
        m.l1_host = (m.config.model_path, max(0, after - before))
        log.info("host_memory_learned", model=m.name, l1_bytes=m.l1_host[1],
                 tree_rss_bytes=after)
        self._read_host()
        limit = self._budget()
        if limit is None:
            return
        held = self._held()
        for name in over_budget(held, limit, self._sleepers()):
            self._record("stop_sleeper", name, f"over the host budget after {m.name}'s "
                         f"level-1 sleep: models hold {_gib(held)}, limit {_gib(limit)} "
                         f"({self.limit_how})")
            self.ops.stop_model(self.core.models[name], "stopped to get host RAM under "
                                "the budget (least recently used level-1 sleeper)")

    def _record(self, action: str, model: str, why: str) -> None:
        log.warning("host_memory", action=action, model=model, why=why)
        self.metrics.actions.labels(action, model).inc()
        self.actions.append({"at": time.time(), "action": action, "model": model,
                             "why": why})

    def status(self) -> dict[str, Any]:
        """The ``memory`` part of ``/v1/status``."""
        host = self.host
        return {
            "host_total_bytes": host.total if host else None,
            "host_available_bytes": host.available if host else None,
            "models_bytes": self._held(),
            "sampled_at": self.sampled_at,
            "limit_bytes": self.limit, "limit": self.core.config.daemon.host_memory_limit,
            "limit_how": self.limit_how or None,
            "recent_actions": list(self.actions),
            # What sleepers keep on each GPU (CUDA context): in the way of wakes/starts.
            "sleepers_gpu_mib": _residue(self.core.models.values()),
        }


def _residue(models: Iterable[ModelRuntime]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in models:
        if m.state is S.SLEEPING:
            for gpu, mib in m.gpu_memory_mib.items():
                out[str(gpu)] = out.get(str(gpu), 0) + mib
    return dict(sorted(out.items()))
