"""Health watchdog for the vLLM children: notice a hung child and say why.

Why: a child stopped with SIGSTOP (or wedged in a driver call, or with a dead
engine loop) keeps its socket open, so its clients wait the full upstream timeout
(600 s) while nothing in llmuxd looks at an active child. The watchdog probes every
child that has a process on a period, with a timeout, and after ``misses``
consecutive failures reports "child X hung: why" through one callback. What to do
then (SIGKILL the group, revoke leases, answer clients 502, restart lazily) is the
supervisor's decision (phase 2 wires it), so this module knows nothing about the
supervisor: a pure decision function plus a small prober thread.

Grace: while an operation with its own deadline runs on the model (start, wake,
sleep, stop), the watchdog does not judge it and forgets earlier misses: a long wake
or a slow L2 reload is bounded by its own timeout, and counting its silence here
would be a false alarm. A heavy batch does not block vLLM's ``/health`` (the API
server's event loop answers it while the engine works), and the timeout and the
consecutive misses absorb a slow answer.

Defaults (period 5 s, timeout 5 s, 3 misses): a SIGSTOPped child is reported within
``detection_bound()`` = 5 + 3 x 5 = 20 s after its last good answer, 25 s at worst
counting the probe in flight when it stopped, well inside the ~30 s target.

A "stuck engine" is the other hang: ``/health`` answers but requests make no
progress. With ``stuck_after_s`` > 0 the probe also reads the child's generation
token counter; requests running while the counter stays flat that long is a hang.
Off by default (0): a long prefill of a huge prompt legitimately produces no token
for a while, so the operator chooses the bound.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

# States in which a child's process exists and no operation of ours runs on it.
WATCHED = frozenset({"active", "draining", "sleeping"})


@dataclass(frozen=True)
class WatchdogSettings:
    """How often to probe, how long to wait, and how many misses make a hang."""

    period_s: float = 5.0
    timeout_s: float = 5.0
    misses: int = 3
    stuck_after_s: float = 0.0      # 0: no stuck-engine check (see module docstring)

    def detection_bound(self) -> float:
        """Seconds after a child's last good answer by which a hang is reported."""
        return self.period_s + self.misses * max(self.period_s, self.timeout_s)


@dataclass(frozen=True)
class ProbeResult:
    """One probe of one child."""

    ok: bool                         # /health answered 200 in time
    why: str = ""                    # what failed, for the report
    running: float | None = None     # requests running in the engine (metrics), if read
    tokens: float | None = None      # generation tokens so far (metrics), if read


@dataclass(frozen=True)
class Watch:
    """What the watchdog remembers about one child between probes."""

    pid: int
    misses: int = 0
    last_why: str = ""
    tokens: float | None = None      # generation tokens at the last progress seen
    progress_at: float | None = None  # when tokens last moved (or running began)
    reported: bool = False


class Verdict(StrEnum):
    OK = "ok"            # answered, or not judged now (grace)
    MISS = "miss"        # a failed probe, not yet a hang
    HUNG = "hung"        # report it (once per child process)


def judge(watch: Watch, state: str, busy: bool, result: ProbeResult | None, now: float,
          settings: WatchdogSettings) -> tuple[Watch, Verdict, str]:
    """The pure decision: the new memory, the verdict, and why (for HUNG).

    ``result`` None means no probe was made this round (grace): nothing is judged.
    """
    if busy or state not in WATCHED or result is None:
        return replace(watch, misses=0, last_why="", tokens=None, progress_at=None), \
            Verdict.OK, ""
    if watch.reported:
        return watch, Verdict.OK, ""
    if not result.ok:
        misses = watch.misses + 1
        why = result.why or "no answer"
        if misses >= settings.misses:
            reason = (f"{misses} health checks failed in a row "
                      f"(period {settings.period_s:g}s, timeout {settings.timeout_s:g}s): "
                      f"{why}")
            return replace(watch, misses=misses, last_why=why, reported=True), \
                Verdict.HUNG, reason
        return replace(watch, misses=misses, last_why=why), Verdict.MISS, ""
    watch = replace(watch, misses=0, last_why="")
    return _judge_progress(watch, result, now, settings)


def _judge_progress(watch: Watch, result: ProbeResult, now: float,
                    settings: WatchdogSettings) -> tuple[Watch, Verdict, str]:
    if settings.stuck_after_s <= 0 or result.tokens is None or result.running is None:
        return watch, Verdict.OK, ""
    if result.running <= 0 or watch.tokens is None or result.tokens != watch.tokens:
        return replace(watch, tokens=result.tokens, progress_at=now), Verdict.OK, ""
    since = watch.progress_at if watch.progress_at is not None else now
    if now - since >= settings.stuck_after_s:
        reason = (f"engine stuck: {result.running:g} requests running and no token "
                  f"generated for {now - since:.0f}s")
        return replace(watch, reported=True), Verdict.HUNG, reason
    return watch, Verdict.OK, ""


# ---------------------------------------------------------------------------
# The prober


@dataclass(frozen=True)
class Target:
    """One child to watch, as the supervisor sees it right now."""

    name: str
    pid: int
    state: str
    busy: bool
    probe: Callable[[float], ProbeResult]   # probe(timeout) -> result; must not raise


def health_probe(client: Any, with_metrics: bool = False) -> Callable[[float], ProbeResult]:
    """A probe over a VllmClient: ``GET /health``, then ``/metrics`` when asked."""

    def probe(timeout: float) -> ProbeResult:
        try:
            resp = client.request("GET", "/health", timeout=timeout)
        except Exception as exc:  # a probe reports, never raises
            return ProbeResult(False, str(exc))
        if resp.status != 200:
            return ProbeResult(False, f"GET /health answered {resp.status}")
        if not with_metrics:
            return ProbeResult(True)
        try:
            values = client.metrics(timeout=timeout)
        except Exception:  # no metrics: no stuck check this round
            return ProbeResult(True)
        return ProbeResult(True, running=values.get("vllm:num_requests_running"),
                           tokens=values.get("vllm:generation_tokens_total"))
    return probe


class Watchdog:
    """Probes every target each period (in parallel) and reports hangs via ``on_hung``.

    ``targets()`` is called once per round (from the watchdog's thread: it must be
    cheap and thread-safe, e.g. a snapshot the supervisor publishes). ``on_hung(name,
    pid, why)`` is called once per hung child process, from the watchdog's thread.
    ``round()`` runs one round synchronously (tests, or a caller's own loop).
    """

    def __init__(self, settings: WatchdogSettings, targets: Callable[[], Iterable[Target]],
                 on_hung: Callable[[str, int, str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._targets = targets
        self._on_hung = on_hung
        self._clock = clock
        self._watches: dict[str, Watch] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="watchdog-probe")

    def round(self) -> list[tuple[str, int, str]]:
        """Probe once, judge, report; returns the hangs reported this round."""
        targets = list(self._targets())
        timeout = self.settings.timeout_s
        futures = {t.name: self._pool.submit(t.probe, timeout)
                   for t in targets if not t.busy and t.state in WATCHED}
        now = self._clock()
        hung = []
        for t in targets:
            watch = self._watches.get(t.name)
            if watch is None or watch.pid != t.pid:
                watch = Watch(pid=t.pid)          # a new process starts with a clean slate
            fut = futures.get(t.name)
            result: ProbeResult | None = None
            if fut is not None:
                try:
                    # The probe has its own timeout; this bound only covers a probe
                    # that ignores it.
                    result = fut.result(timeout=timeout + 5.0)
                except Exception as exc:
                    result = ProbeResult(False, f"probe failed: {exc}")
            watch, verdict, why = judge(watch, t.state, t.busy, result, now, self.settings)
            self._watches[t.name] = watch
            if verdict is Verdict.HUNG:
                hung.append((t.name, t.pid, why))
        for name in set(self._watches) - {t.name for t in targets}:
            del self._watches[name]
        for name, pid, why in hung:
            with contextlib.suppress(Exception):
                self._on_hung(name, pid, why)
        return hung

    def start(self) -> Watchdog:
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self._clock()
            with contextlib.suppress(Exception):
                self.round()
            self._stop.wait(max(0.0, self.settings.period_s - (self._clock() - started)))

    def stop(self, timeout: float = 15.0) -> None:
        """End the thread (bounded by one probe timeout) and the probe pool."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
