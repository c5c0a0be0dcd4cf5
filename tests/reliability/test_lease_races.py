"""Lease races from issue 12, each pinned by a test that failed on the unfixed table.

Unit level (the real LeaseTable, real threads): the orderings are forced with
events, never with sleeps, so each race is hit every run.
"""

from __future__ import annotations

import threading

import pytest

from llmuxd.control.errors import ApiError
from llmuxd.leases import LeaseTable


def table() -> LeaseTable:
    t = LeaseTable(10, lambda: None)
    t.add_model("a", "http://127.0.0.1:1", "a")
    return t


def test_a_waiter_granted_after_its_client_left_is_released_not_handed_back():
    """The grant lands between the client leaving and the waiter's next poll."""
    t = table()
    t.close_gate("a")
    gone = threading.Event()
    results: list[object] = []

    def run() -> None:
        try:
            # poll_interval is long: the grant, not the poll, wakes the waiter.
            results.append(t.acquire("a", 42, 30.0, cancelled=gone.is_set,
                                     poll_interval=30.0))
        except ApiError as exc:
            results.append(exc)

    th = threading.Thread(target=run)
    th.start()
    try:
        while t.view()["a"].queued != 1:
            th.join(0.005)
        gone.set()                       # the client hangs up...
        assert t.open_gate("a") == 1     # ...and the grant comes right after
    finally:
        th.join(10)
    assert not th.is_alive()
    assert isinstance(results[0], ApiError), results
    assert "went away" in str(results[0])
    assert t.leases() == []
    assert t.view()["a"].in_flight == 0


def test_expire_revokes_only_leases_older_than_the_maximum_age():
    t = table()
    t.open_gate("a")
    old = t.acquire("a", 1, 1.0)
    old.granted_at -= 100.0
    young = t.acquire("a", 2, 1.0)
    gone = t.expire(max_age=50.0)
    assert [g.lease_id for g in gone] == [old.lease_id]
    assert [x.lease_id for x in t.leases()] == [young.lease_id]
    assert t.view()["a"].in_flight == 1
    assert t.release(old.lease_id) is None            # revoked: idempotent release
    assert "older than" in (t.revoked_reason(old.lease_id) or "")


def test_expire_of_the_last_lease_during_a_drain_kicks_the_supervisor():
    kicks: list[int] = []
    t = LeaseTable(10, lambda: kicks.append(1))
    t.add_model("a", "http://127.0.0.1:1", "a")
    t.open_gate("a")
    held = t.acquire("a", 1, 1.0)
    held.granted_at -= 100.0
    t.close_gate("a")
    t.expire(max_age=50.0)
    assert t.view()["a"].in_flight == 0
    assert kicks, "a drain waiting on the expired lease must be woken"


@pytest.mark.parametrize("max_age", [0.0, -1.0])
def test_expire_with_no_maximum_is_a_no_op(max_age: float):
    t = table()
    t.open_gate("a")
    held = t.acquire("a", 1, 1.0)
    held.granted_at -= 1e6
    assert t.expire(max_age=max_age) == []
    assert len(t.leases()) == 1
