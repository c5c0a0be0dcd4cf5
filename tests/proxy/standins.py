"""Small real servers the front end talks to in unit tests.

``FakeDaemon`` implements the lease routes of docs/interfaces.md §5 on a real Unix
socket (HTTP/1.1 keep-alive, the daemon's error shape), and the lease socket with
llmuxd's real lease listener (llmuxd/control/lease_listener.py) over a recording
backend. ``FakeChild`` is a tiny
OpenAI-ish HTTP server on 127.0.0.1 that echoes what it received, streams SSE,
and counts the requests it is running, so tests can see a client's disconnect
reach the child. Both run in threads of the test process.
"""

from __future__ import annotations

import json
import socketserver
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from llmuxd.config import lease_socket_path
from llmuxd.control.errors import ApiError
from llmuxd.control.lease_listener import LeaseListener


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def address_string(self) -> str:
        return "unix"

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else None


@dataclass
class FakeModel:
    name: str
    port: int
    aliases: list[str] = field(default_factory=list)
    refuse: tuple[int, str, str] | None = None   # (HTTP status, code, message)
    state: str = "active"
    wait: bool = False  # a lease waits (a switch) until the requester gives up
    upstream: str | None = None  # default http://127.0.0.1:<port>

    @property
    def where(self) -> str:
        return self.upstream or f"http://127.0.0.1:{self.port}"


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up mid-request is normal here


class _TcpServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class _UnixHttpServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class FakeDaemon:
    """The lease routes of llmuxd on a Unix socket, with a record of every call."""

    def __init__(self, socket_path: str, models: list[FakeModel]) -> None:
        self.socket_path = socket_path
        self.models = {m.name: m for m in models}
        self.leases: dict[str, str] = {}
        self.releases: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.healthy = True
        # Close each connection after answering, without saying so (an idle close).
        self.hang_up_after_each = False
        daemon = self

        class Handler(_Quiet):
            def do_GET(self) -> None:
                daemon.get(self)

            def do_POST(self) -> None:
                daemon.post(self)
                if daemon.hang_up_after_each:
                    self.close_connection = True

        self.server = _UnixServer(socket_path, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.listener = LeaseListener(lease_socket_path(socket_path), _FakeBackend(self))
        self.waiting = 0
        self.cancelled_waits = 0

    def __enter__(self) -> FakeDaemon:
        self.thread.start()
        self.listener.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        self.server.shutdown()
        self.server.server_close()

    def grant(self, model: FakeModel) -> dict[str, Any]:
        lease_id = uuid.uuid4().hex
        with self.lock:
            self.leases[lease_id] = model.name
        return {"lease_id": lease_id, "model": model.name, "upstream": model.where,
                "served_model_name": model.name, "waited_ms": 0.5, "switched": False}

    def resolve(self, name: str) -> FakeModel | None:
        for m in self.models.values():
            if name == m.name or name in m.aliases:
                return m
        return None

    def in_flight(self, name: str) -> int:
        with self.lock:
            return sum(1 for model in self.leases.values() if model == name)

    def get(self, h: _Quiet) -> None:
        if not self.healthy:
            h._json(503, {"error": {"code": "shutting_down", "message": "stopping"}})
        elif h.path == "/v1/health":
            h._json(200, {"status": "ok", "version": "test", "pid": 1})
        elif h.path == "/v1/status":
            models = {m.name: {"name": m.name, "state": m.state, "sleep_level": None,
                               "aliases": m.aliases, "in_flight": self.in_flight(m.name),
                               "queued": 0, "state_since": 1700000000.0,
                               "upstream": f"http://127.0.0.1:{m.port}"}
                      for m in self.models.values()}
            h._json(200, {"daemon": {}, "gpus": [], "models": models})
        else:
            h._json(404, {"error": {"code": "not_found", "message": "no route"}})

    def post(self, h: _Quiet) -> None:
        body = h._body()
        if h.path == "/v1/leases":
            model = self.resolve(body["model"])
            if model is None:
                h._json(404, {"error": {"code": "model_not_found",
                                        "message": f"unknown model '{body['model']}'",
                                        "model": body["model"]}})
                return
            if model.refuse is not None:
                status, code, message = model.refuse
                h._json(status, {"error": {"code": code, "message": message,
                                           "model": model.name}})
                return
            h._json(200, self.grant(model))
        elif h.path.startswith("/v1/leases/") and h.path.endswith("/release"):
            lease_id = h.path.split("/")[3]
            with self.lock:
                model_name = self.leases.pop(lease_id, None)
                if model_name is None:
                    h._json(404, {"error": {"code": "not_found", "message": "no lease"}})
                    return
                self.releases.append({"lease_id": lease_id, "model": model_name, **body})
            h._json(200, {"released": True})
        else:
            h._json(404, {"error": {"code": "not_found", "message": "no route"}})


class _FakeBackend:
    """FakeDaemon's answers and records behind the real lease listener."""

    def __init__(self, daemon: FakeDaemon) -> None:
        self.daemon = daemon

    def try_acquire(self, model: str, pid: int) -> dict[str, Any] | None:
        m = self.daemon.resolve(model)
        if m is None:
            raise ApiError("model_not_found", f"unknown model '{model}'", model=model)
        if m.refuse is not None:
            _, code, message = m.refuse
            raise ApiError(code, message, model=m.name)
        if m.wait:
            return None
        return self.daemon.grant(m)

    def acquire(self, model: str, pid: int, cancelled: Any) -> dict[str, Any]:
        with self.daemon.lock:
            self.daemon.waiting += 1
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if cancelled():
                    with self.daemon.lock:
                        self.daemon.cancelled_waits += 1
                    raise ApiError("bad_request", "client went away", model=model)
                time.sleep(0.02)
            raise ApiError("timeout", f"no lease on '{model}' within 30s", model=model)
        finally:
            with self.daemon.lock:
                self.daemon.waiting -= 1

    def release(self, lease_id: str, outcome: dict[str, Any]) -> None:
        with self.daemon.lock:
            model_name = self.daemon.leases.pop(lease_id, None)
            if model_name is not None:
                self.daemon.releases.append({"lease_id": lease_id, "model": model_name,
                                             **outcome})

    def release_answer(self, lease_id: str, outcome: dict[str, Any]) -> dict[str, Any]:
        self.release(lease_id, outcome)
        return {"released": True}

    def peer_gone(self, pid: int) -> None:
        pass


class FakeChild:
    """An OpenAI-ish server on 127.0.0.1:<free port> standing in for one vLLM child."""

    def __init__(self, served_name: str, unix_path: str | None = None) -> None:
        self.served_name = served_name
        self.running = 0
        self.finished = 0
        self.aborted = 0
        self.paths: list[str] = []
        self.lock = threading.Lock()
        self.hang_up_after_each = False
        child = self

        class Handler(_Quiet):
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                child.handle(self)
                if child.hang_up_after_each:
                    self.close_connection = True

            def do_GET(self) -> None:
                child.paths.append(self.path)
                self._json(200, {"ok": True})

        self.server: Any
        if unix_path is not None:  # a child on a Unix socket (lease upstream unix:/...)
            class UnixHandler(Handler):
                disable_nagle_algorithm = False  # TCP_NODELAY is TCP only

                def address_string(self) -> str:
                    return "unix"

            self.server = _UnixHttpServer(unix_path, UnixHandler)
            self.port = 0
        else:
            self.server = _TcpServer(("127.0.0.1", 0), Handler)
            self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeChild:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, h: _Quiet) -> None:
        body = h._body()
        with self.lock:
            self.paths.append(h.path)
            self.running += 1
        try:
            if body.get("model") != self.served_name:
                h._json(404, {"error": {"message": f"model {body.get('model')} not served",
                                        "type": "NotFoundError", "param": None,
                                        "code": 404}})
                return
            if h.path.startswith("/v1/die"):
                h.connection.close()  # dies before answering
                return
            if body.get("stall"):  # says nothing for a while (a hung engine)
                time.sleep(float(body["stall"]))
            if body.get("stream"):
                self._stream(h, body)
                return
            echo = {"id": "x", "object": "echo", "model": body["model"], "path": h.path,
                    "peer_port": h.client_address[1] if h.client_address else 0,
                    "headers": {k.lower(): v for k, v in h.headers.items()},
                    "choices": [{"index": 0, "message": {"role": "assistant",
                                                         "content": "hello"},
                                 "text": "hello", "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                              "total_tokens": 2}}
            h._json(200, echo, {"X-Child": "yes", "Keep-Alive": "timeout=5"})
        finally:
            with self.lock:
                self.running -= 1

    def _stream(self, h: _Quiet, body: dict[str, Any]) -> None:
        count = int(body.get("chunks", 3))
        delay = float(body.get("delay", 0.0))
        pad = "x" * int(body.get("pad", 0))  # bigger events, to fill a client's buffers
        die_after = body.get("die_after")
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        try:
            for i in range(count):
                if die_after is not None and i == die_after:
                    h.close_connection = True
                    h.connection.shutdown(2)
                    return
                event = {"id": "s", "object": "chat.completion.chunk", "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": f"t{i} {pad}"},
                                      "text": f"t{i} ", "finish_reason": None}]}
                data = b"data: " + json.dumps(event).encode() + b"\n\n"
                h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                h.wfile.flush()
                if delay:
                    time.sleep(delay)
            done = b"data: [DONE]\n\n"
            h.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            h.wfile.flush()
            with self.lock:
                self.finished += 1
        except OSError:
            with self.lock:
                self.aborted += 1
            h.close_connection = True
