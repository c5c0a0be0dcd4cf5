"""The asyncio front end's guards, through a real gunicorn with the real worker class.

Slow or stalled clients, a stalled child, a huge body, a child on a Unix socket,
readiness, and the request log line: each is something only the real server
(uvicorn's protocol under gunicorn, real sockets) shows.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from llmuxd.frontend import FrontEnd

from .conftest import Stack, post, served, wait_for, wait_http
from .standins import FakeChild, FakeModel

GUARDS = """
client_write_timeout_secs = 1.0
upstream_idle_timeout_secs = 5.0
head_timeout_secs = 2.0
body_timeout_secs = 2.0
"""


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, FrontEnd]]:
    tmp: Path = tmp_path_factory.mktemp("guarded")
    with Stack(tmp, extra_proxy=GUARDS) as stack, served(stack) as fe:
        yield stack, fe


def worker(fe: FrontEnd) -> psutil.Process:
    assert fe.pid is not None
    children = psutil.Process(fe.pid).children()
    assert len(children) == 1
    return children[0]


def test_stalled_reader_is_dropped_its_upstream_cancelled_and_lease_released(
        guarded: tuple[Stack, FrontEnd]) -> None:
    stack, _ = guarded
    before = len(stack.daemon.releases)
    aborted = stack.child_a.aborted
    sock = socket.socket()
    # A small receive buffer, and then never reading: the worker's writes back up.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", stack.port))
    body = json.dumps({"model": "model-a", "stream": True, "chunks": 100000, "pad": 4000})
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  f"{body}").encode())
    try:
        # Released well before the stream could end (100000 events of 4 kB), i.e.
        # because the worker dropped the reader; never while the socket is open on
        # the threaded front end.
        wait_for(lambda: len(stack.daemon.releases) > before, 30, "the lease release")
        release = stack.daemon.releases[-1]
        assert release["model"] == "model-a"
        assert release["error"] == "client disconnected"
        wait_for(lambda: stack.child_a.aborted > aborted, 30,
                 "the child to see its request end")
        assert stack.daemon.in_flight("model-a") == 0
    finally:
        sock.close()
    # The worker serves on.
    assert post(stack.port, "/v1/completions", {"model": "model-a"})[0] == 200


def test_silent_child_is_504_distinct_from_the_total_timeout(
        guarded: tuple[Stack, FrontEnd]) -> None:
    stack, _ = guarded
    before = len(stack.daemon.releases)
    status, _, body = post(stack.port, "/v1/chat/completions",
                           {"model": "model-a", "stall": 12})
    assert status == 504, body
    assert json.loads(body)["error"]["code"] == "upstream_idle_timeout"
    # Releases are pipelined: an earlier request's may land after ours, so look for
    # ours among the new ones rather than at the end.
    wait_for(lambda: any(r["status"] == 504 for r in stack.daemon.releases[before:]),
             what="the lease released with status 504")


def test_half_sent_heads_and_bodies_are_dropped_and_do_not_block_others(
        guarded: tuple[Stack, FrontEnd]) -> None:
    stack, _ = guarded
    stalled: list[socket.socket] = []
    try:
        for i in range(1000):
            s = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
            if i % 2:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            else:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                          b'{"model": "mo')
            stalled.append(s)
        # Others are served meanwhile (one loop, no thread per connection).
        assert post(stack.port, "/v1/completions", {"model": "model-b"})[0] == 200

        def all_dropped() -> bool:
            for s in stalled:
                s.settimeout(0.0)
                try:
                    if s.recv(1024) != b"":
                        continue
                except BlockingIOError:
                    return False
                except OSError:
                    continue
            return True

        # head_timeout_secs / body_timeout_secs = 2: each is closed by the worker.
        wait_for(all_dropped, 30, "the worker to drop every half-sent request")
    finally:
        for s in stalled:
            s.close()
    assert stack.daemon.in_flight("model-a") == 0


def _vm_hwm_kib(proc: psutil.Process) -> int:
    with open(f"/proc/{proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _reset_hwm(proc: psutil.Process) -> bool:
    """Reset the peak RSS counter (writing 5 to clear_refs); False where not allowed."""
    try:
        with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def test_16_mib_body_costs_at_most_about_twice_its_size(
        guarded: tuple[Stack, FrontEnd]) -> None:
    stack, fe = guarded
    w = worker(fe)
    # 16 MiB of small objects: what json.loads turns into 300-400 MB of Python objects.
    messages = [{"role": "user", "content": "hi"}] * 1
    filler = json.dumps(messages)[1:-1]
    count = (16 * 1024 * 1024 - 200) // (len(filler) + 1)
    big = (b'{"messages": [' + b",".join([filler.encode()] * count) + b'], "model": "model-a"}')
    assert len(big) <= 16 * 1024 * 1024
    small = json.dumps({"model": "model-a", "messages": messages}).encode()
    # Baseline in the same run: the worker's peak after a small request.
    assert post(stack.port, "/v1/chat/completions", small)[0] == 200
    if not _reset_hwm(w):
        pytest.skip("cannot reset the worker's peak RSS counter here")
    base = _vm_hwm_kib(w)
    status, _, _ = post(stack.port, "/v1/chat/completions", big, timeout=120)
    assert status == 200
    grown = (_vm_hwm_kib(w) - base) * 1024
    assert grown <= 2.5 * len(big), f"peak grew by {grown / 2**20:.0f} MiB for a " \
                                    f"{len(big) / 2**20:.0f} MiB body"


def test_request_log_line_and_request_id(stack: Stack,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    # Its own front end, started while capfd holds stdout: the worker writes there.
    fe = FrontEnd(stack.config, str(stack.config_path), stack.socket_path)
    fe.start()
    try:
        wait_http(stack.port, proc=fe)
        status, headers, _ = post(stack.port, "/v1/chat/completions", {"model": "alias-a"},
                                  {"X-Request-Id": "log-me-1"})
    finally:
        fe.stop(timeout=10)
    assert status == 200
    assert headers["x-request-id"] == "log-me-1"

    out = ""
    deadline = time.monotonic() + 10
    while '"log-me-1"' not in out and time.monotonic() < deadline:
        out += capfd.readouterr().out
        time.sleep(0.05)
    lines = [line for line in out.splitlines() if '"log-me-1"' in line]
    assert len(lines) == 1, out[-2000:]
    entry = json.loads(lines[0])
    assert entry["event"] == "request"
    assert entry["model"] == "alias-a"
    assert entry["served_model"] == "model-a"
    assert entry["status"] == 200


def test_child_on_a_unix_socket(tmp_path: Path) -> None:
    child = FakeChild("model-u", unix_path=str(tmp_path / "child.sock"))
    with Stack(tmp_path) as stack, child:
        stack.daemon.models["model-u"] = FakeModel(
            "model-u", 0, upstream=f"unix:{tmp_path / 'child.sock'}")
        fe = FrontEnd(stack.config, str(stack.config_path), stack.socket_path)
        fe.start()
        try:
            wait_http(stack.port, proc=fe)
            status, _, body = post(stack.port, "/v1/chat/completions", {"model": "model-u"})
            assert status == 200, body
            assert json.loads(body)["model"] == "model-u"
            conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
            conn.request("POST", "/v1/chat/completions",
                         json.dumps({"model": "model-u", "stream": True, "chunks": 4}),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            streamed = resp.read()
            conn.close()
            assert resp.status == 200
            assert streamed.count(b"data: ") == 5 and b"[DONE]" in streamed
            # The child counts a stream finished after its last write, which the
            # client may read first.
            wait_for(lambda: child.finished == 1, what="the child to finish the stream")
        finally:
            fe.stop(timeout=10)


def test_connections_over_the_limit_get_an_openai_503(tmp_path: Path) -> None:
    with Stack(tmp_path, extra_proxy="max_connections = 20\nhead_timeout_secs = 60") as stack:
        fe = FrontEnd(stack.config, str(stack.config_path), stack.socket_path)
        fe.start()
        idle: list[socket.socket] = []
        try:
            wait_http(stack.port, proc=fe)
            for _ in range(20):
                idle.append(socket.create_connection(("127.0.0.1", stack.port), timeout=30))
            status, headers, body = (0, {}, b"")
            deadline = time.monotonic() + 30
            while status != 503 and time.monotonic() < deadline:
                status, headers, body = post(stack.port, "/v1/completions",
                                             {"model": "model-a"})
            assert status == 503, body
            assert json.loads(body)["error"]["code"] == "too_many_connections"
            assert headers["retry-after"] == "1"
            for s in idle:
                s.close()
            idle.clear()
            wait_for(lambda: post(stack.port, "/v1/completions", {"model": "model-a"})[0]
                     == 200, 30, "the worker to serve again once they closed")
        finally:
            for s in idle:
                s.close()
            fe.stop(timeout=10)


def test_client_leaving_before_the_answer_head_ends_the_upstream_request(
        guarded: tuple[Stack, FrontEnd]) -> None:
    # A non-streaming answer's head comes only when it is complete: a client that
    # leaves meanwhile must end the request now, not when the child finishes.
    stack, _ = guarded
    before = len(stack.daemon.releases)
    running = stack.child_a.running  # an earlier test's stalled request may still run
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
    body = json.dumps({"model": "model-a", "stall": 12})
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  f"{body}").encode())
    wait_for(lambda: stack.child_a.running > running, what="the child to get the request")
    sock.close()
    wait_for(lambda: len(stack.daemon.releases) > before, 30, "the lease release")
    release = stack.daemon.releases[-1]
    # 499 from the client's leaving, not 504 from the idle timeout (5 s) later.
    assert (release["status"], release["error"]) == (499, "client disconnected")
