"""The daemon's lease listener and the front end's lease client, over a real socket.

The listener runs its real event-loop thread on a real Unix socket, in front of a
real LeaseTable (llmuxd/leases.py) through SupervisorBackend with a small
stand-in for the supervisor; the client is the front end's own LeaseClient.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from llmuxd.config import lease_socket_path
from llmuxd.control.errors import ApiError
from llmuxd.control.lease_listener import (
    LeaseListener,
    SupervisorBackend,
)
from llmuxd.proxy.lease_client import ClientGone, DaemonError, DaemonUnavailable, LeaseClient
from tests.proxy.lease_standin import Sup


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_socket_path_is_next_to_the_control_socket() -> None:
    assert lease_socket_path("/run/llmux/llmuxd.sock") == "/run/llmux/llmuxd.lease.sock"
    assert lease_socket_path("/tmp/ctl") == "/tmp/ctl.lease"


def test_grant_release_and_metrics(daemon: tuple[Sup, str]) -> None:
    sup, control = daemon

    async def go() -> None:
        client = LeaseClient(control, lease_timeout=10)
        lease = await client.acquire("alias-a")
        assert (lease.model, lease.upstream, lease.served_model_name) == (
            "model-a", "http://127.0.0.1:9001", "served-a")
        assert [lo.pid for lo in sup.leases.leases()] == [os.getpid()]  # SO_PEERCRED
        client.release(lease.lease_id, {"status": 200, "duration_ms": 1.0})
        deadline = time.monotonic() + 10
        while sup.leases.leases() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        client.close()

    run(go())
    assert sup.leases.leases() == []
    assert ("released", ("model-a", 200)) in sup.metrics.calls
    assert sup.leases.view()["model-a"].in_flight == 0


def test_refusals_carry_the_control_api_codes(daemon: tuple[Sup, str]) -> None:
    sup, control = daemon
    sup.leases.set_hold("model-b", ApiError("model_failed", "b failed: exit 1"))

    async def go() -> list[tuple[int, str]]:
        client = LeaseClient(control, lease_timeout=10)
        out = []
        for name in ("nope", "model-b"):
            try:
                await client.acquire(name)
            except DaemonError as exc:
                out.append((exc.status, exc.code))
        client.close()
        return out

    assert run(go()) == [(404, "model_not_found"), (503, "model_failed")]
    assert ("refused", ("model-b", "model_failed")) in sup.metrics.calls


def test_many_acquires_in_flight_on_one_connection(daemon: tuple[Sup, str]) -> None:
    sup, control = daemon

    async def go() -> int:
        client = LeaseClient(control, lease_timeout=10)
        leases = await asyncio.gather(*(client.acquire("model-a") for _ in range(200)))
        assert len({lo.lease_id for lo in leases}) == 200
        for lease in leases:
            client.release(lease.lease_id, {"status": 200})
        await asyncio.sleep(0)
        deadline = time.monotonic() + 10
        while sup.leases.leases() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        client.close()
        return len(sup.leases.leases())

    assert run(go()) == 0


def test_a_waiting_acquire_is_granted_when_the_gate_opens(daemon: tuple[Sup, str]) -> None:
    sup, control = daemon

    async def go() -> str:
        client = LeaseClient(control, lease_timeout=10)
        _, fut = await client.begin("model-b")  # gate closed: waits on a thread
        deadline = time.monotonic() + 10
        while sup.leases.view()["model-b"].queued == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        threading.Timer(0.05, sup.leases.open_gate, ("model-b",)).start()
        lease = await client.wait(fut)
        client.close()
        return lease.upstream

    assert run(go()) == "unix:/run/llmux/b.sock"


def test_client_gone_while_waiting_leaves_the_queue(daemon: tuple[Sup, str]) -> None:
    sup, control = daemon

    async def go() -> None:
        client = LeaseClient(control, lease_timeout=10)
        tag, fut = await client.begin("model-b")
        deadline = time.monotonic() + 10
        while sup.leases.view()["model-b"].queued == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        client.cancel(tag, fut)
        with pytest.raises(ClientGone):
            await client.wait(fut)
        while sup.leases.view()["model-b"].queued:
            assert time.monotonic() < deadline, "the waiter stayed queued"
            await asyncio.sleep(0.02)
        client.close()

    run(go())
    assert sup.leases.leases() == []


def test_daemon_gone_is_unavailable(tmp_path: Path) -> None:
    async def go() -> None:
        client = LeaseClient(str(tmp_path / "none.sock"), lease_timeout=5)
        with pytest.raises(DaemonUnavailable):
            await client.acquire("model-a")

    run(go())


def test_a_closed_connection_of_a_dead_peer_reclaims_its_leases(
        daemon: tuple[Sup, str]) -> None:
    sup, control = daemon
    # A forked child takes a lease and dies without releasing it (a killed worker).
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(lease_socket_path(control))
            s.sendall(b'A 1 "model-a"\n')
            s.recv(4096)
            os.write(write, b"x")
            time.sleep(0.2)
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"x"
    os.close(read)
    os.waitpid(pid, 0)
    deadline = time.monotonic() + 10
    while pid not in sup.reclaimed:
        assert time.monotonic() < deadline, "the dead peer's leases were not reclaimed"
        time.sleep(0.02)
    assert sup.leases.leases() == []


def test_refused_peer_is_disconnected(tmp_path: Path) -> None:
    sup = Sup()
    sup.leases.add_model("model-a", "http://127.0.0.1:9001", "model-a")
    sup.leases.open_gate("model-a")
    path = str(tmp_path / "x.lease.sock")
    listener = LeaseListener(path, SupervisorBackend(sup),
                             allowed=lambda uid, gid, pid: False).start()
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        try:
            s.sendall(b'A 1 "model-a"\n')
            assert s.recv(4096) == b""
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.close()
    finally:
        listener.close()
    assert sup.leases.leases() == []
