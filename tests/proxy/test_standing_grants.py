"""Standing grants (issue 11e) on the real lease socket, with a scripted peer.

The listener runs its real event-loop thread on a real Unix socket in front of a real
LeaseTable through SupervisorBackend (the stand-in supervisor of
test_lease_listener.py); the peer is a plain socket that says exactly what the test
scripts, so the orderings that matter (a notice after the daemon decided to drain,
an ack held back) happen every run, without sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import pytest

from llmuxd.config import lease_socket_path
from llmuxd.control.errors import ApiError
from llmuxd.proxy import lease_client
from llmuxd.proxy.lease_client import Lease, LeaseClient
from tests.proxy.lease_standin import Sup


class Peer:
    """A scripted front-end connection: send lines, read lines (with a deadline)."""

    def __init__(self, control: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(lease_socket_path(control))
        self.buf = b""

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def line(self) -> str:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            assert data, "the daemon closed the connection"
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def close(self) -> None:
        self.sock.close()


def wait_until(cond, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def standing_peer(control: str) -> tuple[Peer, str, str, int]:
    """A peer that took a standing grant on model-a: (peer, prefix, lease id, epoch)."""
    peer = Peer(control)
    peer.send("S")
    kind, prefix = peer.line().split(" ", 1)
    assert kind == "S" and prefix
    peer.send('A 1 "model-a"')
    kind, tag, body = peer.line().split(" ", 2)
    grant = json.loads(body)
    assert (kind, tag) == ("+", "1")
    assert isinstance(grant.get("standing"), int), grant
    return peer, prefix, grant["lease_id"], grant["standing"]


def test_drain_waits_for_the_ack_of_a_recalled_standing_grant(
        daemon: tuple[Sup, str]) -> None:
    """The worker admits a request under its grant at the moment the daemon decides to
    drain: the gate must not count as drained until the ack, and then it counts the
    noticed lease until its release."""
    sup, control = daemon
    peer, prefix, first, epoch = standing_peer(control)
    try:
        assert sup.leases.close_gate("model-a") >= 1       # the daemon decides to drain
        assert peer.line() == f"X {epoch}"                 # ...and recalls the grant
        peer.send(f"R {first} {{}}")                      # the granted lease ends
        wait_until(lambda: not sup.leases.leases(), "the release was not read")
        # The ack is held back: a request may have been admitted meanwhile.
        assert sup.leases.view()["model-a"].in_flight == 1, "drained before the ack"
        peer.send(f"N {epoch} {prefix}7")                 # it was: its notice comes
        wait_until(lambda: sup.leases.leases(), "the notice was not recorded")
        assert sup.leases.view()["model-a"].in_flight == 2
        peer.send(f"K {epoch}")
        wait_until(lambda: sup.leases.view()["model-a"].in_flight == 1,
                   "the ack was not read")
        assert [lo.lease_id for lo in sup.leases.leases()] == [f"{prefix}7"]
        assert [lo.pid for lo in sup.leases.leases()] == [os.getpid()]
        kicks = sup.kicks
        peer.send(f"R {prefix}7 {{\"status\": 200}}")
        wait_until(lambda: sup.leases.view()["model-a"].in_flight == 0,
                   "the noticed lease was not released")
        assert sup.kicks > kicks                           # the drain hears it at once
        assert ("released", ("model-a", 200)) in sup.metrics.calls
        # After the recall, requests take the round trip and wait (the gate is shut).
        peer.send('A 2 "model-a"')
        wait_until(lambda: sup.leases.view()["model-a"].queued == 1, "not queued")
    finally:
        peer.close()


def test_a_closed_holder_counts_as_acked(daemon: tuple[Sup, str]) -> None:
    sup, control = daemon
    peer, _prefix, first, epoch = standing_peer(control)
    peer.send(f"R {first} {{}}")
    wait_until(lambda: not sup.leases.leases(), "the release was not read")
    sup.leases.close_gate("model-a")
    assert peer.line() == f"X {epoch}"
    assert sup.leases.view()["model-a"].in_flight == 1
    peer.close()
    wait_until(lambda: sup.leases.view()["model-a"].in_flight == 0,
               "a closed holder still held the drain")


def test_revoke_stops_waiting_and_later_notices_arrive_revoked(
        daemon: tuple[Sup, str]) -> None:
    """A holder that never acks is cut like a drain timeout: revoke forgets its
    recall, and a lease it notices afterwards is not counted (its release says why)."""
    sup, control = daemon
    peer, prefix, first, epoch = standing_peer(control)
    try:
        sup.leases.close_gate("model-a")
        assert peer.line() == f"X {epoch}"
        assert [lo.lease_id for lo in sup.leases.revoke("model-a", "drain timed out")] \
            == [first]
        assert sup.leases.view()["model-a"].in_flight == 0
        peer.send(f"N {epoch} {prefix}9")
        wait_until(lambda: sup.leases.revoked_reason(f"{prefix}9") is not None,
                   "the late notice was not read")
        assert sup.leases.leases() == []
        assert sup.leases.view()["model-a"].in_flight == 0
    finally:
        peer.close()


def test_no_standing_grant_without_asking_or_while_something_is_pending(
        daemon: tuple[Sup, str]) -> None:
    sup, control = daemon
    plain = Peer(control)                      # never said S: the old protocol
    try:
        plain.send('A 1 "model-a"')
        assert "standing" not in json.loads(plain.line().split(" ", 2)[2])
    finally:
        plain.close()
    sup.leases.set_hold("model-a", ApiError("model_failed", "held"))  # pending: a hold
    peer = Peer(control)
    try:
        peer.send("S")
        peer.line()
        peer.send('A 1 "model-a"')
        assert "standing" not in json.loads(peer.line().split(" ", 2)[2])
    finally:
        peer.close()


def test_notices_with_a_foreign_prefix_are_refused(daemon: tuple[Sup, str]) -> None:
    sup, control = daemon
    peer, prefix, first, epoch = standing_peer(control)
    try:
        peer.send(f"N {epoch} {first}")        # an id the daemon gave out: a collision
        peer.send(f"N {epoch} other-1")
        peer.send(f"N {epoch} {prefix}1")
        wait_until(lambda: len(sup.leases.leases()) == 2, "the good notice was not read")
        assert sorted(lo.lease_id for lo in sup.leases.leases()) == sorted(
            [first, f"{prefix}1"])
    finally:
        peer.close()


def test_the_client_admits_locally_and_acks_a_recall_after_its_notices(
        daemon: tuple[Sup, str]) -> None:
    """The front end's own LeaseClient: round trip once, then local leases noticed to
    the daemon; a recall sends it back to the round trip."""
    sup, control = daemon

    async def go() -> None:
        client = LeaseClient(control, lease_timeout=10)
        first = await client.acquire("alias-a")
        assert client.local("model-b") is None
        local = client.local("alias-a")
        assert local is not None
        assert (local.model, local.upstream, local.served_model_name) == (
            "model-a", "http://127.0.0.1:9001", "served-a")
        more = [client.local("alias-a") for _ in range(5)]
        ids = {first.lease_id, local.lease_id, *(lo.lease_id for lo in more if lo)}
        assert len(ids) == 7
        deadline = time.monotonic() + 10
        while len(sup.leases.leases()) < 7:
            assert time.monotonic() < deadline, "notices not recorded"
            await asyncio.sleep(0.005)
        await asyncio.to_thread(sup.leases.close_gate, "model-a")
        while sup.leases.view()["model-a"].in_flight != 7:   # the ack came: 7 leases
            assert time.monotonic() < deadline, sup.leases.view()
            await asyncio.sleep(0.005)
        assert client.local("alias-a") is None
        for lease_id in ids:
            client.release(lease_id, {"status": 200})
        while sup.leases.view()["model-a"].in_flight:
            assert time.monotonic() < deadline, "releases not recorded"
            await asyncio.sleep(0.005)
        client.close()

    asyncio.run(go())
    assert sup.leases.leases() == []


class FakeHolder:
    """A holder for the table alone: records the recalls it was told."""

    def __init__(self) -> None:
        self.recalled: list[int] = []

    def recall(self, epoch: int) -> None:
        self.recalled.append(epoch)


def held_table() -> tuple[Sup, FakeHolder, int]:
    sup = Sup()
    sup.leases.add_model("model-a", "http://127.0.0.1:9001", "served-a")
    sup.leases.open_gate("model-a")
    holder = FakeHolder()
    epoch = sup.leases.standing_for("model-a", holder)
    assert epoch is not None
    assert sup.leases.standing_for("model-a", holder) == epoch   # one per holder
    return sup, holder, epoch


@pytest.mark.parametrize("what", ["hold", "shutdown", "new address", "removal"])
def test_everything_that_ends_admission_recalls(what: str) -> None:
    sup, holder, epoch = held_table()
    t = sup.leases
    if what == "hold":
        t.set_hold("model-a", ApiError("model_failed", "held"))
    elif what == "shutdown":
        t.shut()
    elif what == "new address":
        t.add_model("model-a", "unix:/run/llmux/a.sock", "served-a")
    else:
        t.remove_model("model-a", ApiError("model_not_found", "removed"))
    assert holder.recalled == [epoch]
    if what == "new address":      # the gate stays open: a new grant, a new epoch
        assert t.standing_for("model-a", holder) not in (None, epoch)
    else:
        assert t.standing_for("model-a", holder) is None
    if what in ("hold", "shutdown", "new address"):
        assert t.view()["model-a"].in_flight == 1          # until the ack
        assert t.total_in_flight() == 1
        t.notice(epoch, "p-1", 4242)                       # admitted before the ack
        t.ack(epoch)
        assert t.view()["model-a"].in_flight == 1
        t.release("p-1")
        assert t.total_in_flight() == 0


def test_noticed_leases_expire_and_are_reclaimed_like_granted_ones() -> None:
    sup, holder, epoch = held_table()
    t = sup.leases
    old = t.notice(epoch, "p-1", 4242)
    assert old is not None
    old.granted_at -= 100.0
    t.notice(epoch, "p-2", 4343)
    assert [lo.lease_id for lo in t.expire(max_age=50.0)] == ["p-1"]
    assert t.revoked_reason("p-1") is not None
    assert [lo.lease_id for lo in t.reclaim_pid(4343)] == ["p-2"]
    assert t.view()["model-a"].in_flight == 0
    t.holder_gone(holder)                                   # its connection closed
    assert t.notice(epoch, "p-3", 4242) is None             # nothing admits under it now
    assert t.leases() == []


# -- lazy lines (fifth pass): notices and standing releases held back, D and Q ----------


@pytest.fixture
def lazy(daemon: tuple[Sup, str], monkeypatch: pytest.MonkeyPatch) -> tuple[Sup, str]:
    """The stand-in daemon, with the front end's lazy lines held back for an hour: only
    an urgent line (or a recall, or a flush) sends them."""
    monkeypatch.setattr(lease_client, "LAZY_FLUSH", 3600.0)
    return daemon


async def standing_client(control: str) -> tuple[LeaseClient, Lease, Lease]:
    """The front end's client holding a standing grant on model-a: (client, the granted
    lease, one lease admitted locally)."""
    client = LeaseClient(control, lease_timeout=10)
    first = await client.acquire("alias-a")
    lease = client.local("alias-a")
    assert lease is not None
    return client, first, lease


async def until(cond, what: str) -> None:  # type: ignore[no-untyped-def]
    """Poll ``cond`` on the loop (10 s deadline)."""
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


def test_notices_held_back_are_written_before_the_ack_of_a_recall(
        lazy: tuple[Sup, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Notices wait for the next write (here: never, but for the recall); the K that
    answers a recall must still follow every one of them, or the drain ends while a
    request the worker admitted is on its way."""
    sup, control = lazy

    async def go() -> None:
        client, first, _ = await standing_client(control)
        admitted = [client.local("alias-a") for _ in range(4)]
        assert all(admitted)
        await asyncio.sleep(0.05)
        assert [lo.lease_id for lo in sup.leases.leases()] == [first.lease_id], \
            "a notice left before anything urgent"
        await asyncio.to_thread(sup.leases.close_gate, "model-a")
        await until(lambda: at_ack, "no ack")
        client.close()

    at_ack = record_acks(sup, monkeypatch)
    asyncio.run(go())
    assert at_ack == [6], "the ack came before the notices held back"
    assert len(sup.leases.leases()) == 6


def record_acks(sup: Sup, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many leases the daemon had recorded at each ack it read (filled as they
    come)."""
    seen: list[int] = []
    real = sup.leases.ack

    def ack(epoch: int) -> None:
        seen.append(len(sup.leases.leases()))
        real(epoch)

    monkeypatch.setattr(sup.leases, "ack", ack)
    return seen


def test_a_request_that_ended_before_its_notice_is_one_done_line(
        lazy: tuple[Sup, str]) -> None:
    sup, control = lazy

    async def go() -> None:
        client, first, lease = await standing_client(control)
        ended: list[float] = []

        def outcome(at: float) -> bytes:
            ended.append(at)
            return b'{"status": 200, "ended_at": %.6f}' % at

        client.finish(lease, 201, 1.5, lambda at: b"{}")
        client.finish(first, 200, 2.0, outcome)               # under the grant: lazy too
        await asyncio.sleep(0.3)
        assert sup.leases.view()["model-a"].in_flight == 1, "sent before anything urgent"
        used = sup.leases.view()["model-a"].last_use
        sent = time.monotonic()
        await client.begin("model-b")                         # an urgent line: the lot
        await until(lambda: not sup.leases.view()["model-a"].in_flight, "not released")
        # The model was last used when the requests ended (the later one: the R line's
        # "ended_at"), not when the lines came (at least 0.3 s later).
        last_use = sup.leases.view()["model-a"].last_use
        assert used < last_use < sent
        assert last_use == pytest.approx(ended[0], abs=1e-5)
        client.close()

    asyncio.run(go())
    assert sup.leases.leases() == []
    assert ("released", ("model-a", 201)) in sup.metrics.calls   # the D line
    assert ("released", ("model-a", 200)) in sup.metrics.calls


def test_a_release_a_drain_waits_for_is_not_held_back(
        lazy: tuple[Sup, str], monkeypatch: pytest.MonkeyPatch) -> None:
    sup, control = lazy

    async def go() -> None:
        client, _, lease = await standing_client(control)
        await asyncio.to_thread(sup.leases.close_gate, "model-a")
        await until(lambda: at_ack, "no ack")             # recalled and acked
        client.finish(lease, 200, 1.0, lambda at: b"{}")  # the grant is gone: at once
        await until(lambda: sup.leases.view()["model-a"].in_flight == 1,
                    "the release was held back")
        client.close()

    at_ack = record_acks(sup, monkeypatch)
    asyncio.run(go())
    assert at_ack == [2]


def test_a_failed_request_learns_why_its_unnoticed_lease_was_revoked(
        lazy: tuple[Sup, str]) -> None:
    """The release that asks "was it revoked?" travels behind the lease's notice on the
    lease socket: it can no longer overtake the notice (over the control API it
    could, and the client's 502 lost the reason)."""
    sup, control = lazy

    async def go() -> dict[str, object]:
        client, _, lease = await standing_client(control)
        # The daemon revokes the model's leases (it killed a hung child) while the
        # local lease's notice is still held back, then the request fails.
        await asyncio.to_thread(sup.leases.revoke, "model-a", "the child hung")
        answer = await client.release_now(lease, {"status": 502})
        client.close()
        return answer

    answer = asyncio.run(go())
    assert answer.get("revoked"), answer
    assert sup.leases.leases() == []


def test_lines_held_back_are_written_when_the_worker_stops(
        lazy: tuple[Sup, str]) -> None:
    """A worker that exits (front-end restart, shutdown) writes what it held back, so
    llmuxd counts the requests of its last ~20 ms (the worker's server calls the
    app's ``flush_held`` at the end of its shutdown; through a real gunicorn stopped
    by SIGTERM: tests/reliability/test_worker_exit_flush.py)."""
    sup, control = lazy

    async def go() -> None:
        client, _, lease = await standing_client(control)
        client.finish(lease, 200, 1.0, lambda at: b"{}")
        await asyncio.sleep(0.05)
        assert ("released", ("model-a", 200)) not in sup.metrics.calls
        client.flush_now()
        await until(lambda: ("released", ("model-a", 200)) in sup.metrics.calls,
                    "the held-back line was not written")
        client.close()

    asyncio.run(go())
