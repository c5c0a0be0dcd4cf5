"""The health watchdog wired into the daemon: what it watches and what a hang does.

``watchdog.py`` judges (a pure function) and probes (a thread of its own, one
``GET /health`` per child and period); it knows nothing of the daemon. This keeper
is the wiring, on the loop thread: each pass it publishes the children to watch
(an immutable snapshot the prober reads without a lock), and a "hung" report
comes back through the mailbox to ``Switcher.child_hung``, which kills the group,
revokes the leases with the reason and leaves the model to restart on the next
request. The settings are ``daemon.watchdog_*`` (re-read on reload; a period of 0
stops the prober).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from llmuxd.config import DaemonConfig
from llmuxd.core import Core
from llmuxd.switching import Switcher
from llmuxd.watchdog import ProbeResult, Target, Watchdog, WatchdogSettings, health_probe

log = structlog.get_logger("llmuxd.supervisor")

Probe = Callable[[float], ProbeResult]


def watchdog_settings(d: DaemonConfig) -> WatchdogSettings | None:
    """The watchdog's settings from the config; None when it is turned off."""
    if d.watchdog_period_secs <= 0:
        return None
    return WatchdogSettings(period_s=d.watchdog_period_secs,
                            timeout_s=d.watchdog_timeout_secs,
                            misses=d.watchdog_misses,
                            stuck_after_s=d.watchdog_stuck_secs)


class WatchdogKeeper:
    """Starts, retunes and stops the prober; publishes its targets; routes its reports."""

    def __init__(self, core: Core, ops: Switcher) -> None:
        self.core = core
        self.ops = ops
        self.dog: Watchdog | None = None
        self._targets: tuple[Target, ...] = ()
        self._probes: dict[tuple[str, int], Probe] = {}

    def configure(self) -> None:
        """Boot and reload: start, retune or stop the prober from ``daemon.watchdog_*``."""
        settings = watchdog_settings(self.core.config.daemon)
        if settings is None:
            if self.dog is not None:
                log.info("watchdog_off")
                self.stop()
            return
        if self.dog is None:
            self.dog = Watchdog(settings, self.targets, self._hung).start()
        elif self.dog.settings == settings:
            return
        else:
            self.dog.settings = settings
            self._probes = {}           # the metrics read depends on stuck_after_s
        log.info("watchdog", period_s=settings.period_s, timeout_s=settings.timeout_s,
                 misses=settings.misses, stuck_after_s=settings.stuck_after_s,
                 bound_s=settings.detection_bound())

    def targets(self) -> tuple[Target, ...]:
        """The children to probe now (the prober's thread; a published snapshot)."""
        return self._targets

    def publish(self) -> None:
        """Each loop pass: every child with a process, its state and whether it is busy."""
        if self.dog is None:
            return
        with_metrics = self.dog.settings.stuck_after_s > 0
        probes: dict[tuple[str, int], Probe] = {}
        targets = []
        for m in self.core.models.values():
            child, client = m.child, m.client
            if child is None or client is None:
                continue
            key = (m.name, child.pid)
            probe = self._probes.get(key) or health_probe(client, with_metrics)
            probes[key] = probe
            targets.append(Target(name=m.name, pid=child.pid, state=str(m.state),
                                  busy=m.busy, probe=probe))
        self._probes = probes
        self._targets = tuple(targets)

    def _hung(self, name: str, pid: int, why: str) -> None:
        """The prober's report (its thread): act on the loop thread."""
        self.core.post(lambda: self.ops.child_hung(name, pid, why))

    def stop(self) -> None:
        """End the prober (shutdown, or a reload that turned it off)."""
        dog, self.dog = self.dog, None
        self._targets = ()
        if dog is not None:
            dog.stop(timeout=1.0)     # a probe in flight ends on its own timeout
