"""Leases: who may send requests to which model right now, and who is waiting.

Why a lock here when ARCHITECTURE.md says one thread owns the state: the lease
round trip is on every proxied request, and handing each acquire/release to the
supervisor thread and back costs two thread switches (~100 µs of CPU on a busy
box). So this table is the one piece of shared state, guarded by one short lock,
with a split of duties that keeps the supervisor the only decision maker:

* control-API threads may only *take* a lease through an open gate, queue a
  waiter, cancel their own waiter, and release a lease;
* only the supervisor thread opens or closes a gate, grants or refuses waiters,
  revokes leases of a dead child and reclaims those of a dead client.

The gate is the original tool's draining flag done under a lock: the check "gate
open" and the in-flight increment happen in one critical section, and closing
the gate reads the in-flight count in another, so a lease can never slip in
after a drain has seen zero.

Standing grants (issue 11e): a front-end connection that asks for them may be
granted, with a lease on a model whose gate is open and that nothing is pending
against, a *standing grant* (an epoch) to admit further requests for that model
itself. Each one it admits arrives as a notice (``notice``) and is recorded here as a
Lease exactly like a granted one. Whatever closes the gate (close_gate, set_hold,
shut, revoke) *recalls* the model's standing grants: the holder is told
(``Holder.recall``), and until it acknowledges (``ack``; its notices sent before the
ack precede it on the stream) or its connection closes (``holder_gone``), each
unacknowledged recall counts as one in flight in the gate's busy count
(``GateView.in_flight``, ``close_gate``, the idle kick), so a drain cannot see zero
while a request the holder admitted is still on its way to being noticed. A holder
that never acks is ended by the drain's own timeout: ``revoke`` forgets its recall
(and any notice of a revoked grant arrives already revoked).

Measured (tests/daemon/lease_bench.py, this 2-core box, shared): one acquire plus one
release over a keep-alive Unix-socket connection costs the daemon about 50-90 µs of
CPU in total (two HTTP requests: parse, route, JSON, lock, metrics), with a client
p50 of ~80 µs at concurrency 1. The supervisor loop is not involved at all unless a
request has to wait.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmuxd.errors import ApiError, model_not_found, shutting_down

_TOMBSTONES = 4096


@dataclass
class Lease:
    """One granted permission to send one request upstream."""

    lease_id: str
    model: str
    pid: int
    granted_at: float          # time.monotonic()
    waited_s: float
    switched: bool


class Holder(Protocol):
    """A front-end connection holding standing grants (the lease listener's)."""

    def recall(self, epoch: int) -> None:
        """Tell the holder to stop admitting under ``epoch``; thread-safe, must not block."""


@dataclass(eq=False)
class Standing:
    """One standing grant: ``holder`` may admit requests for ``model`` itself."""

    epoch: int
    model: str
    holder: Holder
    state: str = "live"        # live → recalling (told, no ack yet) | revoked


@dataclass(eq=False)
class Waiter:
    """One blocked acquire; the supervisor grants or refuses it, or it times out."""

    model: str
    pid: int
    enqueued_at: float
    event: threading.Event = field(default_factory=threading.Event)
    lease: Lease | None = None
    error: ApiError | None = None


@dataclass
class Gate:
    """Per-model lease state: open when the model is ACTIVE and not draining."""

    model: str
    upstream: str = ""
    served_model_name: str = ""
    open: bool = False
    in_flight: int = 0
    queue: deque[Waiter] = field(default_factory=deque)
    watch_idle: bool = False    # supervisor wants a kick when in_flight reaches 0
    hold: ApiError | None = None  # refuse at once (model FAILED)
    last_use: float = 0.0       # monotonic time of the last grant or release (idle time)
    standing: dict[Any, int] = field(default_factory=dict)  # holder → its live epoch
    recalling: set[int] = field(default_factory=set)  # recalled epochs not yet acked

    @property
    def busy(self) -> int:
        """Leases in flight plus unacknowledged recalls (each may hide one more)."""
        return self.in_flight + len(self.recalling)


@dataclass(frozen=True)
class GateView:
    """A consistent copy of one gate for the supervisor's decisions and status."""

    open: bool
    in_flight: int
    queued: int
    oldest_wait: float | None
    wait_sum: float = 0.0       # sum of the waiters' arrival times (their total age: n*now - sum)
    newest_wait: float | None = None
    last_use: float = 0.0       # the last grant or release (idle since, when nothing is in flight)


class LeaseTable:
    """Lease bookkeeping shared by the control threads and the supervisor."""

    def __init__(self, max_queue: int, kick: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._gates: dict[str, Gate] = {}
        self._leases: dict[str, Lease] = {}
        self._tombstones: OrderedDict[str, str] = OrderedDict()
        self._ids = itertools.count(1)
        self._epochs = itertools.count(1)
        self._standing: dict[int, Standing] = {}
        self._prefix = f"{os.getpid():x}-"
        self._kick = kick
        self.max_queue = max_queue
        self.closed = False

    # -- control-API side ---------------------------------------------------

    def acquire(self, model: str, pid: int, timeout: float,
                cancelled: Callable[[], bool] | None = None,
                poll_interval: float = 0.25) -> Lease:
        """A lease on ``model``: at once through an open gate, else wait in FIFO order."""
        start = time.monotonic()
        with self._lock:
            gate, lease = self._admit(model, pid, start)
            if lease is not None:
                return lease
            if len(gate.queue) >= self.max_queue:
                raise ApiError("queue_full", f"the queue for '{model}' is full "
                               f"({self.max_queue} waiting)", model=model)
            waiter = Waiter(model=model, pid=pid, enqueued_at=start)
            gate.queue.append(waiter)
        self._kick()
        deadline = start + timeout
        while True:
            remaining = deadline - time.monotonic()
            if waiter.event.wait(min(poll_interval, max(0.0, remaining))):
                break
            gone = cancelled is not None and cancelled()
            if gone or time.monotonic() >= deadline:
                with self._lock:
                    if waiter.lease is None and waiter.error is None:
                        self._remove_waiter(waiter)
                        if gone:
                            waiter.error = ApiError("bad_request", "client went away",
                                                    model=model)
                        else:
                            waiter.error = ApiError(
                                "timeout", f"no lease on '{model}' within {timeout:g}s",
                                model=model)
                break
        if waiter.lease is not None:
            # Granted, but the client may have left between its last poll and the
            # grant: a lease handed to nobody would count until its worker dies and
            # hold every drain of the model for the full drain timeout.
            if cancelled is not None and cancelled():
                self.release(waiter.lease.lease_id)
                raise ApiError("bad_request", "client went away", model=model)
            return waiter.lease
        assert waiter.error is not None
        raise waiter.error

    def try_acquire(self, model: str, pid: int) -> Lease | None:
        """The non-blocking half of acquire(): a lease through an open gate, a refusal
        (raised), or None when the caller would have to wait (then call acquire()).

        For the lease listener's event loop, which must never block on a switch."""
        with self._lock:
            return self._admit(model, pid, time.monotonic())[1]

    def _admit(self, model: str, pid: int, start: float) -> tuple[Gate, Lease | None]:
        """Under the lock: a lease through an open gate with nobody queued, a refusal
        (raised: shutting down, unknown model, a hold), or (gate, None): wait."""
        if self.closed:
            raise shutting_down()
        gate = self._gates.get(model)
        if gate is None:
            raise model_not_found(model)
        if gate.open and not gate.queue:
            return gate, self._grant(gate, pid, start, switched=False)
        if gate.hold is not None:
            raise gate.hold
        return gate, None

    def release(self, lease_id: str, at: float | None = None) -> Lease | None:
        """End a lease; None when it was already revoked/reclaimed (idempotent).
        ``at``: when it ended (monotonic), if the holder said so (a release sent late)."""
        kick = False
        ended = _when(at)
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                if lease_id in self._tombstones:
                    return None
                raise ApiError("not_found", f"unknown lease '{lease_id}'")
            gate = self._gates.get(lease.model)
            if gate is not None:
                gate.in_flight -= 1
                gate.last_use = max(gate.last_use, ended)
                kick = gate.busy == 0 and gate.watch_idle
        if kick:
            self._kick()
        return lease

    # -- supervisor side ----------------------------------------------------

    def add_model(self, model: str, upstream: str, served_model_name: str) -> None:
        recalls: list[tuple[Holder, int]] = []
        with self._lock:
            gate = self._gates.setdefault(model, Gate(model))
            if (gate.upstream, gate.served_model_name) != (upstream, served_model_name):
                recalls = self._recall(gate)  # holders cached the old address
            gate.upstream = upstream
            gate.served_model_name = served_model_name
            gate.hold = None
        _tell(recalls)

    def remove_model(self, model: str, error: ApiError) -> list[Lease]:
        """Forget a model (reload removed it): refuse its waiters, drop its leases."""
        revoked = self.revoke(model, "model removed")
        self.refuse(model, error)
        with self._lock:
            self._gates.pop(model, None)
        return revoked

    def open_gate(self, model: str) -> int:
        """Let leases through and grant every waiter in arrival order; returns how many."""
        now = time.monotonic()
        with self._lock:
            gate = self._gates[model]
            gate.open = True
            gate.watch_idle = False
            granted = 0
            if self.closed:
                return 0
            while gate.queue:
                waiter = gate.queue.popleft()
                waiter.lease = self._grant(gate, waiter.pid, waiter.enqueued_at,
                                           switched=True, now=now)
                waiter.event.set()
                granted += 1
            return granted

    def set_hold(self, model: str, error: ApiError | None) -> None:
        """Refuse new acquires for ``model`` at once with ``error`` (None lifts it)."""
        recalls: list[tuple[Holder, int]] = []
        with self._lock:
            gate = self._gates.get(model)
            if gate is not None:
                gate.hold = error
                if error is not None:
                    recalls = self._recall(gate)
        _tell(recalls)

    def close_gate(self, model: str) -> int:
        """Stop new leases (drain) and recall the standing grants; returns the busy count
        now (leases plus unacknowledged recalls). A kick comes when it hits 0."""
        with self._lock:
            gate = self._gates[model]
            gate.open = False
            gate.watch_idle = True
            recalls = self._recall(gate)
            busy = gate.busy
        _tell(recalls)
        return busy

    def watch_idle(self, model: str) -> None:
        """Kick the supervisor when ``model``'s in-flight count next reaches 0 (its gate
        stays open): a policy waiting for the active model to go idle hears it at once."""
        with self._lock:
            gate = self._gates.get(model)
            if gate is not None:
                gate.watch_idle = True

    def refuse(self, model: str, error: ApiError) -> int:
        """Wake every waiter of ``model`` with ``error``; returns how many."""
        with self._lock:
            gate = self._gates.get(model)
            if gate is None:
                return 0
            count = len(gate.queue)
            while gate.queue:
                waiter = gate.queue.popleft()
                waiter.error = error
                waiter.event.set()
            return count

    def revoke(self, model: str, reason: str) -> list[Lease]:
        """Drop every lease on ``model`` (its child died or was stopped), recall its
        standing grants and stop waiting for their acks: a lease noticed under one of
        them from now on arrives revoked."""
        recalls: list[tuple[Holder, int]] = []
        with self._lock:
            gate = self._gates.get(model)
            gone = [lease for lease in self._leases.values() if lease.model == model]
            for lease in gone:
                del self._leases[lease.lease_id]
                self._tomb(lease.lease_id, reason)
            if gate is not None:
                gate.in_flight = 0
                recalls = self._recall(gate)
                for epoch in gate.recalling:
                    st = self._standing.get(epoch)
                    if st is not None:
                        st.state = "revoked"
                gate.recalling.clear()
        _tell(recalls)
        return gone

    # -- standing grants (the lease listener's loop thread) ------------------

    def standing_for(self, model: str, holder: Holder) -> int | None:
        """A standing grant on ``model`` for ``holder`` (its live epoch, or a new one),
        or None when the gate is not open with nothing pending against the model."""
        with self._lock:
            gate = self._gates.get(model)
            # Not watch_idle: "kick me when idle" decides nothing, and the counts it
            # watches stay exact under standing grants (it is sticky until the gate
            # next opens, so honouring it would turn grants off for good).
            if (self.closed or gate is None or not gate.open or gate.queue
                    or gate.hold is not None):
                return None
            epoch = gate.standing.get(holder)
            if epoch is None:
                epoch = next(self._epochs)
                gate.standing[holder] = epoch
                self._standing[epoch] = Standing(epoch, model, holder)
            return epoch

    def notice(self, epoch: int, lease_id: str, pid: int,
               at: float | None = None) -> Lease | None:
        """Record a lease its holder admitted under standing grant ``epoch``, exactly
        like a granted one; None when the grant was revoked first (the lease is
        tombstoned: its release is a no-op that reports why). ``at``: when it was
        admitted (monotonic; notices leave up to ~20 ms late)."""
        now = _when(at)
        with self._lock:
            st = self._standing.get(epoch)
            gate = self._gates.get(st.model) if st is not None else None
            if st is None or gate is None or st.state == "revoked" or lease_id in self._leases:
                self._tomb(lease_id, "admitted under a standing grant that was revoked")
                return None
            lease = Lease(lease_id=lease_id, model=st.model, pid=pid, granted_at=now,
                          waited_s=0.0, switched=False)
            self._leases[lease_id] = lease
            gate.in_flight += 1
            gate.last_use = max(gate.last_use, now)
            return lease

    def done(self, epoch: int, at: float | None = None) -> str | None:
        """A request its holder admitted under standing grant ``epoch`` and finished
        before its notice left (one ``D`` line for ``N`` + ``R``): the model's last use
        moves, nothing is in flight for it. The model, or None for an unknown epoch.

        Why it may skip the lease: a drain only ever waits for requests still on their
        way, and the holder writes the notice of every one still open before it acks a
        recall, so a request that ended unnoticed held nothing anybody waited for.
        ``at``: when it ended (monotonic), so the model's idle time is not reset by a
        line that came late."""
        ended = _when(at)
        with self._lock:
            st = self._standing.get(epoch)
            gate = self._gates.get(st.model) if st is not None else None
            if st is None or gate is None:
                return None
            gate.last_use = max(gate.last_use, ended)
            kick = gate.busy == 0 and gate.watch_idle
        if kick:
            self._kick()
        return st.model

    def ack(self, epoch: int) -> None:
        """The holder stopped admitting under ``epoch`` (a recall's answer)."""
        with self._lock:
            st = self._standing.pop(epoch, None)
            kick = st is not None and self._forget(st)
        if kick:
            self._kick()

    def holder_gone(self, holder: Holder) -> None:
        """The holder's connection closed: as good as an ack of all its grants (its
        leases stay, reclaimed with its process as before)."""
        kick = False
        with self._lock:
            for st in [st for st in self._standing.values() if st.holder is holder]:
                del self._standing[st.epoch]
                kick = self._forget(st) or kick
        if kick:
            self._kick()

    def expire(self, max_age: float, now: float | None = None) -> list[Lease]:
        """Revoke the leases older than ``max_age`` seconds (``max_lease_secs``); <= 0: none.

        A lease is one request; one that outlives any sane request is a leak (a
        worker that lost track of it), and it would hold every drain of its model.
        """
        if max_age <= 0:
            return []
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [lease for lease in self._leases.values()
                    if now - lease.granted_at > max_age]
            kick = self._drop(gone, f"lease older than max_lease_secs ({max_age:g}s)")
        if kick:
            self._kick()
        return gone

    def revoked_reason(self, lease_id: str) -> str | None:
        """Why a lease was revoked or reclaimed (None: unknown or released normally)."""
        with self._lock:
            return self._tombstones.get(lease_id)

    def pids_with_leases(self) -> set[int]:
        with self._lock:
            return {lease.pid for lease in self._leases.values()}

    def reclaim_pid(self, pid: int) -> list[Lease]:
        """Drop the leases of a client process that died."""
        with self._lock:
            gone = [lease for lease in self._leases.values() if lease.pid == pid]
            kick = self._drop(gone, f"client pid {pid} died")
        if kick:
            self._kick()
        return gone

    def _drop(self, gone: list[Lease], why: str) -> bool:
        """Under the lock: forget ``gone`` (tombstoned with ``why``) and stop counting
        them; True when a gate someone watches went idle (kick the loop)."""
        kick = False
        for lease in gone:
            del self._leases[lease.lease_id]
            self._tomb(lease.lease_id, why)
            gate = self._gates.get(lease.model)
            if gate is not None:
                gate.in_flight -= 1
                kick = kick or (gate.busy == 0 and gate.watch_idle)
        return kick

    def shut(self) -> int:
        """Refuse every waiter and every future acquire (daemon stopping); recall every
        standing grant."""
        recalls: list[tuple[Holder, int]] = []
        with self._lock:
            self.closed = True
            models = list(self._gates)
            for gate in self._gates.values():
                recalls += self._recall(gate)
        _tell(recalls)
        return sum(self.refuse(m, shutting_down()) for m in models)

    def view(self) -> dict[str, GateView]:
        with self._lock:
            return {
                name: GateView(open=g.open, in_flight=g.busy, queued=len(g.queue),
                               oldest_wait=g.queue[0].enqueued_at if g.queue else None,
                               wait_sum=sum(w.enqueued_at for w in g.queue),
                               newest_wait=g.queue[-1].enqueued_at if g.queue else None,
                               last_use=g.last_use)
                for name, g in self._gates.items()
            }

    def total_in_flight(self) -> int:
        with self._lock:
            return sum(g.busy for g in self._gates.values())

    def leases(self) -> list[Lease]:
        with self._lock:
            return list(self._leases.values())

    def describe(self) -> dict[str, Any]:
        """Upstream and served name for each model (for building lease answers)."""
        with self._lock:
            return {n: (g.upstream, g.served_model_name) for n, g in self._gates.items()}

    def upstream(self, model: str) -> tuple[str, str]:
        gate = self._gates[model]
        return gate.upstream, gate.served_model_name

    # -- internals (lock held) ----------------------------------------------

    def _grant(self, gate: Gate, pid: int, since: float, switched: bool,
               now: float | None = None) -> Lease:
        now = time.monotonic() if now is None else now
        lease = Lease(lease_id=f"{self._prefix}{next(self._ids)}", model=gate.model,
                      pid=pid, granted_at=now, waited_s=now - since, switched=switched)
        self._leases[lease.lease_id] = lease
        gate.in_flight += 1
        gate.last_use = now
        return lease

    def _recall(self, gate: Gate) -> list[tuple[Holder, int]]:
        """Move ``gate``'s live standing grants to recalling; the holders to tell (after
        the lock is released: telling one wakes another thread)."""
        recalls = []
        for holder, epoch in gate.standing.items():
            st = self._standing.get(epoch)
            if st is not None:
                st.state = "recalling"
                gate.recalling.add(epoch)
                recalls.append((holder, epoch))
        gate.standing.clear()
        return recalls

    def _forget(self, st: Standing) -> bool:
        """Drop ``st`` (already out of ``_standing``) from its gate; True when a watched
        gate went idle."""
        gate = self._gates.get(st.model)
        if gate is None:
            return False
        if gate.standing.get(st.holder) == st.epoch:
            del gate.standing[st.holder]
        if st.epoch in gate.recalling:
            gate.recalling.discard(st.epoch)
            return gate.busy == 0 and gate.watch_idle
        return False

    def _remove_waiter(self, waiter: Waiter) -> None:
        gate = self._gates.get(waiter.model)
        if gate is not None:
            with contextlib.suppress(ValueError):
                gate.queue.remove(waiter)

    def _tomb(self, lease_id: str, reason: str) -> None:
        self._tombstones[lease_id] = reason
        while len(self._tombstones) > _TOMBSTONES:
            self._tombstones.popitem(last=False)


def _when(at: float | None) -> float:
    """A holder's monotonic timestamp (same clock: CLOCK_MONOTONIC is system-wide),
    trusted only between a minute ago and now; else now."""
    now = time.monotonic()
    if at is None or not now - 60.0 <= at <= now:
        return now
    return at


def _tell(recalls: list[tuple[Holder, int]]) -> None:
    for holder, epoch in recalls:
        holder.recall(epoch)
