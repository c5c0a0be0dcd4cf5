"""The control socket and the metrics port are bounded: cap, timeouts, strict parsing.

Each test drives a real llmuxd (``--no-frontend``) over real sockets, except the
failed-thread-start test, which needs a thread factory that fails on demand and so
runs a real ControlServer in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from llmux_testkit.daemon import free_port, sim_model
from llmuxd.config import DaemonConfig

WAIT = 20.0


def _unix(path: str, timeout: float = WAIT) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def _read_response(s: socket.socket) -> tuple[int, dict[str, Any]]:
    """One HTTP response (status, JSON body) read until the server closes or the body ends."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), data[:200]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split()[1]), json.loads(body)


def _raw(path: str, payload: bytes) -> tuple[int, dict[str, Any]]:
    with contextlib.closing(_unix(path)) as s:
        s.sendall(payload)
        return _read_response(s)


def _closed_by_server(s: socket.socket, deadline: float) -> bool:
    """True once the server closes ``s`` (EOF or reset) before ``deadline``."""
    while time.monotonic() < deadline:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if s.recv(4096) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


# b"\xb2" is "²" in latin-1 (how the header is decoded): str.isdigit() says yes.
@pytest.mark.parametrize("value", [b"\xb2", b"\xb9\xb2", b"+5", b"-1", b"5x", b"0x10",
                                   b"1" * 30, b"5, 6"])
def test_a_content_length_that_is_not_plain_ascii_digits_is_a_400(make_daemon, value):
    d = make_daemon({"a": sim_model()})
    req = b"POST /v1/leases HTTP/1.1\r\nHost: x\r\nContent-Length: " + value + b"\r\n\r\n"
    status, body = _raw(d.socket, req)
    assert status == 400
    assert body["error"]["code"] == "bad_request"
    assert "Content-Length" in body["error"]["message"]
    assert d.request("GET", "/v1/status")[0] == 200
    assert "Traceback" not in d.output()


def test_connections_over_the_cap_get_a_503_and_threads_stay_bounded(make_daemon):
    cap = 8
    d = make_daemon({"a": sim_model()}, config={"daemon": {"max_connections": cap}})
    before = _threads(d.pid)
    idle = [_unix(d.socket) for _ in range(cap)]
    try:
        # Every idle connection holds a slot once the daemon has accepted it: the
        # connection after them must be refused in the API's error shape.
        deadline = time.monotonic() + WAIT
        while True:
            with contextlib.closing(_unix(d.socket)) as extra:
                try:
                    extra.settimeout(2.0)
                    status, body = _read_response(extra)
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, "no 503 for a connection over the cap"
        assert status == 503
        assert body["error"]["code"] == "too_many_connections"
        assert _threads(d.pid) <= before + cap
    finally:
        for s in idle:
            s.close()
    # The slots come back: a fresh client is served again.
    deadline = time.monotonic() + WAIT
    while True:
        try:
            if d.request("GET", "/v1/status", timeout=5)[0] == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "slots never came back"
        time.sleep(0.1)


def test_an_idle_connection_is_closed_after_idle_timeout(make_daemon):
    d = make_daemon({"a": sim_model()}, config={"daemon": {"idle_timeout_secs": 0.5}})
    with contextlib.closing(_unix(d.socket)) as s:
        assert _closed_by_server(s, time.monotonic() + WAIT)
    # A kept-alive connection is closed too once it idles after a request.
    with contextlib.closing(_unix(d.socket)) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(s)[0] == 200
        assert _closed_by_server(s, time.monotonic() + WAIT)


def test_a_request_that_stalls_half_way_is_closed_after_read_timeout(make_daemon):
    d = make_daemon({"a": sim_model()},
                    config={"daemon": {"read_timeout_secs": 0.5, "idle_timeout_secs": 600}})
    with contextlib.closing(_unix(d.socket)) as s:
        s.sendall(b"POST /v1/leases HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"mod")
        assert _closed_by_server(s, time.monotonic() + WAIT)
    assert d.request("GET", "/v1/status")[0] == 200


# -- metrics port ----------------------------------------------------------------------


def _listen_addrs(pid: int, port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_metrics_listen_on_loopback_by_default(make_daemon):
    port = free_port()
    d = make_daemon({"a": sim_model()}, config={"metrics_port": port})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
    assert _listen_addrs(d.pid, port) == {"127.0.0.1"}


def test_metrics_port_caps_connections_and_closes_idle_ones(make_daemon):
    from llmuxd.metrics import METRICS_MAX_CONNECTIONS as cap
    port = free_port()
    d = make_daemon({"a": sim_model()},
                    config={"metrics_port": port, "daemon": {"read_timeout_secs": 5.0}})
    before = _threads(d.pid)
    extra = 20
    idle = [socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            for _ in range(cap + extra)]
    try:
        # The connections over the cap are answered 503 at once and closed; the others
        # wait for their request, each on a thread, until the read timeout closes them.
        answers = [_drain(s, time.monotonic() + WAIT) for s in idle]
        busy = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert len(busy) >= extra, answers
        assert _threads(d.pid) <= before + cap
    finally:
        for s in idle:
            s.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200


def _drain(s: socket.socket, deadline: float) -> bytes:
    """Everything the server sends on ``s`` until it closes it (by ``deadline``)."""
    data = b""
    while time.monotonic() < deadline:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = s.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError("the server kept an idle metrics connection open")


# -- a failed thread start ---------------------------------------------------------------


class _Sup:
    def reclaim_pid(self, pid: int) -> None:
        pass


@pytest.fixture
def control_server(tmp_path: Path) -> Iterator[Any]:
    from llmuxd.control import server as srv

    cfg = DaemonConfig(socket=str(tmp_path / "c.sock"))
    s = srv.ControlServer(_Sup(), cfg)
    yield s
    s.close()


def test_a_failed_thread_start_backs_off_and_keeps_accepting(control_server, monkeypatch):
    from llmuxd.control import server as srv

    failures = threading.Event()
    real = threading.Thread.start
    calls = {"n": 0}

    def flaky(self: threading.Thread) -> None:
        if self.name == "control-conn":
            calls["n"] += 1
            if calls["n"] <= 2:
                failures.set()
                raise RuntimeError("can't start new thread")
        real(self)

    monkeypatch.setattr(threading.Thread, "start", flaky)
    monkeypatch.setattr(srv, "dispatch", lambda sup, req, ok: (200, {"ok": True}))
    control_server.start()
    for _ in range(2):
        with contextlib.closing(_unix(control_server.path)) as s:
            # The server may close it before the request is even sent (EPIPE): fine.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(b"GET /v1/health HTTP/1.1\r\n\r\n")
            # The connection whose thread could not start is closed, not left hanging.
            assert _closed_by_server(s, time.monotonic() + WAIT)
    assert failures.is_set()
    status, body = _raw(control_server.path, b"GET /v1/health HTTP/1.1\r\n\r\n")
    assert (status, body) == (200, {"ok": True})
