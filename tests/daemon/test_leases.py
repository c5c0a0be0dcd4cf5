"""The lease table: fast path, FIFO waiters, bounds, drains, revokes and reclaims."""

from __future__ import annotations

import threading

import pytest

from llmuxd.control.errors import ApiError
from llmuxd.leases import LeaseTable


class Kicks:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def table(max_queue: int = 10) -> tuple[LeaseTable, Kicks]:
    kicks = Kicks()
    t = LeaseTable(max_queue, kicks)
    t.add_model("a", "http://127.0.0.1:1", "a")
    return t, kicks


def waiter(t: LeaseTable, results: list, timeout: float = 30.0, **kw) -> threading.Thread:
    def run() -> None:
        try:
            results.append(t.acquire("a", 42, timeout, **kw))
        except ApiError as exc:
            results.append(exc)
    th = threading.Thread(target=run)
    th.start()
    return th


def wait_queued(t: LeaseTable, n: int) -> None:
    import time
    deadline = time.monotonic() + 10
    while t.view()["a"].queued != n:
        assert time.monotonic() < deadline, "waiter never queued"
        time.sleep(0.005)


def test_open_gate_grants_at_once_without_kicking_the_supervisor():
    t, kicks = table()
    t.open_gate("a")
    lease = t.acquire("a", 1, 1.0)
    assert (lease.model, lease.switched, t.view()["a"].in_flight) == ("a", False, 1)
    assert kicks.count == 0


def test_unknown_model_is_model_not_found():
    t, _ = table()
    with pytest.raises(ApiError) as exc:
        t.acquire("zzz", 1, 1.0)
    assert exc.value.code == "model_not_found"


def test_waiters_are_granted_in_arrival_order_when_the_gate_opens():
    t, kicks = table()
    results: list = []
    threads = []
    for i in range(3):
        threads.append(waiter(t, results))
        wait_queued(t, i + 1)
    assert kicks.count == 3
    t.open_gate("a")
    for th in threads:
        th.join(10)
    ids = [r.lease_id for r in results]
    assert len(ids) == 3 and all(r.switched for r in results)
    assert t.view()["a"].in_flight == 3


def test_queue_full_refuses_beyond_max_queue():
    t, _ = table(max_queue=1)
    results: list = []
    th = waiter(t, results)
    wait_queued(t, 1)
    with pytest.raises(ApiError) as exc:
        t.acquire("a", 2, 1.0)
    assert exc.value.code == "queue_full"
    t.refuse("a", ApiError("shutting_down", "bye"))
    th.join(10)
    assert results[0].code == "shutting_down"


def test_wait_times_out_and_leaves_the_queue():
    t, _ = table()
    with pytest.raises(ApiError) as exc:
        t.acquire("a", 1, 0.05, poll_interval=0.01)
    assert exc.value.code == "timeout"
    assert t.view()["a"].queued == 0


def test_cancelled_waiter_leaves_the_queue():
    t, _ = table()
    gone = threading.Event()
    results: list = []
    th = waiter(t, results, cancelled=gone.is_set, poll_interval=0.01)
    wait_queued(t, 1)
    gone.set()
    th.join(10)
    assert isinstance(results[0], ApiError) and t.view()["a"].queued == 0


def test_closed_gate_queues_and_release_to_zero_kicks_the_drain():
    t, kicks = table()
    t.open_gate("a")
    lease = t.acquire("a", 1, 1.0)
    assert t.close_gate("a") == 1
    before = kicks.count
    t.release(lease.lease_id)
    assert kicks.count == before + 1
    assert t.view()["a"].in_flight == 0


def test_revoked_lease_release_is_idempotent_and_unknown_is_not_found():
    t, _ = table()
    t.open_gate("a")
    lease = t.acquire("a", 1, 1.0)
    assert [x.lease_id for x in t.revoke("a", "child died")] == [lease.lease_id]
    assert t.view()["a"].in_flight == 0
    assert t.release(lease.lease_id) is None
    with pytest.raises(ApiError) as exc:
        t.release("nope")
    assert exc.value.code == "not_found"


def test_reclaim_pid_drops_only_that_clients_leases():
    t, _ = table()
    t.open_gate("a")
    t.acquire("a", 1, 1.0)
    keep = t.acquire("a", 2, 1.0)
    assert len(t.reclaim_pid(1)) == 1
    assert [x.lease_id for x in t.leases()] == [keep.lease_id]
    assert t.view()["a"].in_flight == 1


def test_hold_refuses_at_once_and_shut_refuses_everything():
    t, _ = table()
    t.set_hold("a", ApiError("model_failed", "held"))
    with pytest.raises(ApiError) as exc:
        t.acquire("a", 1, 1.0)
    assert exc.value.code == "model_failed"
    t.set_hold("a", None)
    t.shut()
    with pytest.raises(ApiError) as exc:
        t.acquire("a", 1, 1.0)
    assert exc.value.code == "shutting_down"
