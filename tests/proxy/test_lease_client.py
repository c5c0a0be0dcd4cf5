"""The lease client against the fake daemon: keep-alive, pipelined release, errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from llmuxd.proxy.lease_client import DaemonError, DaemonUnavailable, LeaseClient

from .conftest import Stack


def wait_releases(stack: Stack, n: int) -> None:
    deadline = time.monotonic() + 30
    while len(stack.daemon.releases) < n:
        assert time.monotonic() < deadline, stack.daemon.releases
        time.sleep(0.01)


def test_lease_carries_upstream_and_served_name(stack: Stack) -> None:
    client = LeaseClient(stack.socket_path, lease_timeout=10)
    lease = client.acquire("alias-a")
    assert (lease.model, lease.served_model_name) == ("model-a", "model-a")
    assert (lease.host, lease.port) == ("127.0.0.1", stack.child_a.port)
    client.release(lease.lease_id, {"status": 200})
    wait_releases(stack, 1)
    assert stack.daemon.in_flight("model-a") == 0


@pytest.mark.parametrize("hang_up", [False, True])
def test_pipelined_releases_all_arrive(stack: Stack, hang_up: bool) -> None:
    # With hang_up the daemon closes every connection after answering without a
    # Connection: close header, as an idle timeout would: nothing may get lost.
    stack.daemon.hang_up_after_each = hang_up
    client = LeaseClient(stack.socket_path, lease_timeout=10)
    for i in range(5):
        lease = client.acquire("model-b")
        client.release(lease.lease_id, {"status": 200, "bytes": i})
    assert client.status()["models"]["model-b"]["name"] == "model-b"
    wait_releases(stack, 5)
    assert sorted(r["bytes"] for r in stack.daemon.releases) == [0, 1, 2, 3, 4]
    assert stack.daemon.in_flight("model-b") == 0


def test_refusal_is_a_daemon_error_with_its_code(stack: Stack) -> None:
    client = LeaseClient(stack.socket_path, lease_timeout=10)
    with pytest.raises(DaemonError) as err:
        client.acquire("model-full")
    assert (err.value.status, err.value.code) == (429, "queue_full")


def test_no_socket_is_daemon_unavailable(tmp_path: Path) -> None:
    client = LeaseClient(str(tmp_path / "none.sock"), lease_timeout=10)
    with pytest.raises(DaemonUnavailable):
        client.health()
