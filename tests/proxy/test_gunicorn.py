"""The front end under real gunicorn (FrontEnd), against the fake daemon and children.

These pin what only a real server shows: chunked streaming as it is produced, a
client that goes away mid-stream, a child that dies mid-stream, a killed worker.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from llmuxd.frontend import FrontEnd

from .conftest import Stack, post, wait_for


def test_request_through_gunicorn(gunicorn_stack: tuple[Stack, FrontEnd]) -> None:
    stack, _ = gunicorn_stack
    status, headers, body = post(stack.port, "/v1/chat/completions", {"model": "alias-a"},
                                 {"X-Request-Id": "abc"})
    assert status == 200, body
    assert json.loads(body)["model"] == "model-a"
    assert headers["x-request-id"] == "abc"
    # The child's Server header is not leaked (the front end sends none of its own).
    assert "basehttp" not in headers.get("server", "").lower()


def test_stream_chunks_arrive_as_produced(gunicorn_stack: tuple[Stack, FrontEnd]) -> None:
    stack, _ = gunicorn_stack
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    conn.request("POST", "/v1/chat/completions",
                 json.dumps({"model": "model-a", "stream": True, "chunks": 5, "delay": 0.4}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("transfer-encoding") == "chunked"
    arrivals = []
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            break
        arrivals.append(time.monotonic())
    conn.close()
    # Five events 0.4 s apart (1.6 s): unbuffered means they arrive spread out, not
    # at once at the end (generous margin for a loaded machine).
    assert len(arrivals) >= 5
    assert arrivals[-1] - arrivals[0] >= 0.8


def test_client_disconnect_mid_stream_ends_upstream_and_releases(
        gunicorn_stack: tuple[Stack, FrontEnd]) -> None:
    stack, _ = gunicorn_stack
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
    body = json.dumps({"model": "model-a", "stream": True, "chunks": 2000, "delay": 0.01})
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  f"{body}").encode())
    assert b"200 OK" in sock.recv(4096)
    wait_for(lambda: stack.child_a.running == 1, what="the child to run the stream")
    sock.close()
    wait_for(lambda: stack.child_a.running == 0, what="the child to see the request end")
    assert stack.child_a.aborted == 1
    assert stack.child_a.finished == 0
    wait_for(lambda: len(stack.daemon.releases) == 1, what="the lease release")
    assert stack.daemon.releases[0]["error"] == "client disconnected"
    assert stack.daemon.in_flight("model-a") == 0


def test_child_dying_mid_stream_is_reported_and_cut(
        gunicorn_stack: tuple[Stack, FrontEnd]) -> None:
    stack, _ = gunicorn_stack
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    conn.request("POST", "/v1/chat/completions",
                 json.dumps({"model": "model-a", "stream": True, "chunks": 10, "die_after": 3}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = b""
    try:
        while chunk := resp.read1(65536):
            data += chunk
        ended_cleanly = True
    except http.client.IncompleteRead:
        ended_cleanly = False
    conn.close()
    assert not ended_cleanly, "a broken stream must not look complete"
    assert b'"code": "upstream_error"' in data
    assert b"[DONE]" not in data
    wait_for(lambda: len(stack.daemon.releases) == 1, what="the lease release")
    assert "mid-response" in stack.daemon.releases[0]["error"]


def test_upstream_unreachable_is_502_through_gunicorn(
        gunicorn_stack: tuple[Stack, FrontEnd]) -> None:
    stack, _ = gunicorn_stack
    status, _, body = post(stack.port, "/v1/chat/completions", {"model": "model-gone"})
    assert status == 502
    assert json.loads(body)["error"]["code"] == "upstream_error"


def test_killed_worker_is_replaced_and_serving_goes_on(
        gunicorn_stack: tuple[Stack, FrontEnd]) -> None:
    stack, fe = gunicorn_stack
    assert fe.pid is not None
    master = psutil.Process(fe.pid)
    workers = master.children()
    assert len(workers) == 1
    os.kill(workers[0].pid, signal.SIGKILL)
    wait_for(lambda: [w.pid for w in master.children()] not in ([], [workers[0].pid]),
             what="gunicorn to start a new worker")

    def serves() -> bool:
        try:
            return post(stack.port, "/v1/completions", {"model": "model-b"})[0] == 200
        except OSError:
            return False

    wait_for(serves, what="the front end to serve again")


def test_stop_takes_down_master_and_workers(gunicorn_stack: tuple[Stack, FrontEnd]) -> None:
    _, fe = gunicorn_stack
    assert fe.pid is not None
    pids = [fe.pid] + [p.pid for p in psutil.Process(fe.pid).children()]
    assert fe.stop(timeout=10) is not None
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def test_front_end_exits_nonzero_when_its_port_is_taken(stack: Stack) -> None:
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", stack.port))
        squatter.listen()
        fe = FrontEnd(stack.config, str(stack.config_path), stack.socket_path)
        fe.start()
        try:
            wait_for(lambda: fe.poll() is not None, 60, "gunicorn to give up on the port")
            assert fe.poll() != 0
        finally:
            fe.stop(timeout=10)


def test_front_end_dies_with_the_process_that_started_it(stack: Stack) -> None:
    # A stand-in daemon starts the front end and is then SIGKILLed: PR_SET_PDEATHSIG
    # must take gunicorn down with it (llmuxd's guardian is the second line).
    script = (
        "import sys, time\n"
        "from llmuxd.config import load_config\n"
        "from llmuxd.frontend import FrontEnd\n"
        f"fe = FrontEnd(load_config({str(stack.config_path)!r}), {str(stack.config_path)!r},"
        f" {stack.socket_path!r})\n"
        "fe.start()\n"
        "print(fe.pid, flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              start_new_session=True)
    gunicorn_pid = 0
    try:
        assert parent.stdout is not None
        gunicorn_pid = int(parent.stdout.readline())
        wait_for(lambda: post(stack.port, "/v1/completions", {"model": "model-a"})[0] == 200
                 if _listening(stack.port) else False, what="the front end to serve")
        parent.kill()
        parent.wait(30)
        wait_for(lambda: not psutil.pid_exists(gunicorn_pid)
                 or psutil.Process(gunicorn_pid).status() == psutil.STATUS_ZOMBIE,
                 what="gunicorn to exit after its parent died")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(30)
        if gunicorn_pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(gunicorn_pid, signal.SIGKILL)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_stopping_worker_ends_its_requests_just_before_gunicorn_would_kill_it() -> None:
    """uvicorn's cancel comes before gunicorn's kill (graceful_timeout), with room for
    the requests to answer, release and log: 2 s, or a fifth of a short grace."""
    from llmuxd.proxy.worker import shutdown_grace

    assert shutdown_grace(660) == 658
    assert shutdown_grace(3) == pytest.approx(2.4)
    assert shutdown_grace(1) == pytest.approx(0.8)
    assert shutdown_grace(0) == 0


def test_a_stopping_worker_keeps_notifying_the_master_while_its_requests_finish() -> None:
    """uvicorn's server, stopping with a connection that stays open (a long stream):
    gunicorn's heartbeat callback keeps being called until the graceful time ends."""
    import asyncio

    from uvicorn import Config
    from uvicorn.lifespan.off import LifespanOff

    from llmuxd.proxy.worker import FlushingServer

    beats: list[float] = []
    flushed: list[bool] = []

    async def notify() -> None:
        beats.append(time.monotonic())

    class OpenConnection:
        def shutdown(self) -> None:
            pass  # a stream in progress: it ends with its answer, not now

    async def go() -> None:
        config = Config(app=None, timeout_notify=0.1, callback_notify=notify,  # type: ignore[arg-type]
                        timeout_graceful_shutdown=1)
        server = FlushingServer(config, flush=lambda: flushed.append(True))
        server.servers = []  # not started: no listening socket to close, no lifespan
        server.lifespan = LifespanOff(config)
        server.server_state.connections.add(OpenConnection())  # type: ignore[arg-type]
        await server.shutdown()

    asyncio.run(go())
    # ~10 at one per 0.1 s over the 1 s grace; none without the heartbeat. Two or more
    # (not a count that a loaded box could miss) is what "kept notifying" needs.
    assert len(beats) >= 2, beats
    assert flushed == [True]
