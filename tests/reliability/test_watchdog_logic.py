"""The watchdog's pure decisions and its prober, with fake probes and a fake clock.

The end-to-end SIGSTOP test (real daemon, real child) is in test_faults_r2.py.
"""

from __future__ import annotations

import socket
import threading

from llmuxd.vllm_client import VllmClient
from llmuxd.watchdog import (
    ProbeResult,
    Target,
    Verdict,
    Watch,
    Watchdog,
    WatchdogSettings,
    health_probe,
    judge,
)

S = WatchdogSettings(period_s=5, timeout_s=5, misses=3)
BAD = ProbeResult(False, "no answer within 5.0s")
GOOD = ProbeResult(True)


def run(results: list[ProbeResult | None], state: str = "active", busy: bool = False,
        settings: WatchdogSettings = S) -> list[Verdict]:
    watch, verdicts = Watch(pid=1), []
    for i, r in enumerate(results):
        watch, verdict, _ = judge(watch, state, busy, r, float(i * 5), settings)
        verdicts.append(verdict)
    return verdicts


def test_three_misses_in_a_row_are_a_hang_reported_once():
    assert run([BAD, BAD, BAD, BAD]) == [Verdict.MISS, Verdict.MISS, Verdict.HUNG, Verdict.OK]


def test_a_good_answer_resets_the_count():
    assert run([BAD, BAD, GOOD, BAD, BAD]) == [Verdict.MISS, Verdict.MISS, Verdict.OK,
                                               Verdict.MISS, Verdict.MISS]


def test_the_reason_says_how_many_failed_and_the_last_error():
    watch = Watch(pid=1)
    for _ in range(3):
        watch, verdict, why = judge(watch, "active", False, BAD, 0.0, S)
    assert verdict is Verdict.HUNG
    assert "3 health checks failed in a row" in why and "no answer within 5.0s" in why


def test_no_judgement_while_an_operation_runs_and_misses_are_forgotten():
    """A long wake (or start, or sleep) has its own deadline: never a false alarm."""
    assert run([BAD] * 20, state="waking") == [Verdict.OK] * 20
    assert run([BAD] * 20, state="starting") == [Verdict.OK] * 20
    assert run([BAD] * 20, busy=True) == [Verdict.OK] * 20
    watch = Watch(pid=1)
    watch, _, _ = judge(watch, "active", False, BAD, 0, S)
    watch, _, _ = judge(watch, "active", False, BAD, 5, S)
    watch, v, _ = judge(watch, "waking", False, None, 10, S)      # an op in between
    assert v is Verdict.OK and watch.misses == 0
    watch, v, _ = judge(watch, "active", False, BAD, 15, S)
    assert v is Verdict.MISS


def test_sleeping_and_draining_children_are_watched():
    assert run([BAD] * 3, state="sleeping")[-1] is Verdict.HUNG
    assert run([BAD] * 3, state="draining")[-1] is Verdict.HUNG


def test_detection_bound_of_the_defaults_is_within_30s():
    d = WatchdogSettings()
    assert d.detection_bound() + d.timeout_s <= 30


def test_stuck_engine_needs_running_requests_and_flat_tokens_for_the_bound():
    s = WatchdogSettings(stuck_after_s=60)
    watch = Watch(pid=1)
    verdicts, whys = [], []
    for t in range(0, 80, 10):                       # requests running, tokens flat
        watch, v, why = judge(watch, "active", False,
                              ProbeResult(True, running=4, tokens=100), float(t), s)
        verdicts.append(v)
        whys.append(why)
    assert verdicts[:6] == [Verdict.OK] * 6 and verdicts[6] is Verdict.HUNG
    assert "engine stuck" in whys[6]
    moving = Watch(pid=1)
    for t in range(0, 200, 10):                      # tokens move: never stuck
        moving, v, _ = judge(moving, "active", False,
                             ProbeResult(True, running=4, tokens=float(t)), float(t), s)
        assert v is Verdict.OK
    idle = Watch(pid=1)
    for t in range(0, 200, 10):                      # nothing running: never stuck
        idle, v, _ = judge(idle, "active", False,
                           ProbeResult(True, running=0, tokens=5), float(t), s)
        assert v is Verdict.OK


def test_the_prober_reports_once_per_process_and_forgets_gone_children():
    results = {"a": BAD, "b": GOOD}
    pids = {"a": 10, "b": 20}
    reports: list[tuple[str, int, str]] = []

    def targets() -> list[Target]:
        return [Target(n, pids[n], "active", False, lambda _t, n=n: results[n])
                for n in results]

    dog = Watchdog(S, targets, lambda *r: reports.append(r))
    try:
        for _ in range(5):
            dog.round()
        assert [(n, p) for n, p, _ in reports] == [("a", 10)]
        pids["a"] = 11                               # restarted: a new process, a clean slate
        for _ in range(3):
            dog.round()
        assert [(n, p) for n, p, _ in reports] == [("a", 10), ("a", 11)]
    finally:
        dog.stop()


def test_health_probe_times_out_on_a_server_that_accepts_and_never_answers(tmp_path):
    """What a SIGSTOPped child looks like: the kernel accepts, nobody answers."""
    path = str(tmp_path / "hung.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)
    try:
        probe = health_probe(VllmClient(0, "m", uds=path))
        result = probe(0.3)
        assert not result.ok and "no answer" in result.why
    finally:
        srv.close()


def test_the_thread_runs_rounds_and_stops():
    seen = threading.Event()

    def targets() -> list[Target]:
        seen.set()
        return []

    dog = Watchdog(WatchdogSettings(period_s=0.01), targets, lambda *r: None).start()
    try:
        assert seen.wait(10)
    finally:
        dog.stop()
    assert dog._thread is not None and not dog._thread.is_alive()
