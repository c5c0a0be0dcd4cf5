"""A small but real control-API server on a Unix socket, with canned state.

Why: llmuxctl's edge cases (403 from the daemon, a daemon that hangs up, a slow wake
for the progress line, a failing validate) must be testable without depending on the
real llmuxd producing each of them on cue. It speaks the routes and the error shape
of docs/interfaces.md section 5 over a real socket; llmuxctl runs as a real process.
"""

from __future__ import annotations

import copy
import json
import os
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


def model_status(name: str, port: int, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name, "state": "stopped", "sleep_level": None, "configured_sleep_level": 1,
        "pid": None, "port": port, "upstream": f"http://127.0.0.1:{port}", "in_flight": 0,
        "queued": 0, "gpus": [0], "gpu_memory_mib": {}, "gpu_memory_utilization": 0.45,
        "state_since": time.time() - 65, "aliases": [], "restarts": 0, "last_error": None,
        "last_switch": None,
    }
    base.update(over)
    return base


def validate_report(model: str, levels: list[int], *, fail_level: int | None = None
                    ) -> dict[str, Any]:
    rows = []
    for level in levels:
        bad = level == fail_level
        rows.append({
            "level": level, "sleep_s": 0.5, "wake_s": 0.25, "gpu_before_mib": 36864,
            "gpu_after_mib": 36864 if bad else 1331, "gpu_wake_mib": 36864,
            "response": "match", "passed": not bad, "skipped": False,
            "reason": "the sleep freed nothing: GPU 0 holds 36864 MiB" if bad else "",
            "answer": "hello", "gpu_after_by_gpu": {"0": 36864 if bad else 1331},
        })
    return {"model": model, "probe": "sim", "levels": levels,
            "passed": fail_level is None, "error": None, "baseline": "hello",
            "left_awake": True, "rows": rows}


class FakeState:
    """What the fake daemon knows and how it should misbehave; tests change it freely."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.models: dict[str, dict[str, Any]] = {
            "alpha": model_status("alpha", 8101, state="active", pid=4242,
                                  gpu_memory_mib={"0": 36864}, aliases=["a"],
                                  last_switch={"from": "beta", "to": "alpha", "result": "ok",
                                               "started_at": time.time() - 300,
                                               "phases_ms": {"drain": 1.0, "sleep": 500.0,
                                                             "verify": 2.0, "wake": 250.0,
                                                             "warmup": 10.0},
                                               "total_ms": 763.0}),
            "beta": model_status("beta", 8102, state="sleeping", sleep_level=2,
                                 configured_sleep_level=2, pid=4343,
                                 gpu_memory_mib={"0": 1331}),
        }
        self.logs: dict[str, list[str]] = {"alpha": [f"alpha line {i}" for i in range(1, 101)]}
        self.requests: list[tuple[str, str, Any]] = []   # (method, path with query, body)
        self.deny_mutations = False     # answer 403 permission_denied to every POST
        self.hang_up = False            # close the connection without an answer
        self.op_delay = 0.0             # seconds a long operation takes
        self.validate_fail_level: int | None = None
        self.reload_result: dict[str, list[str]] = {"added": ["gamma"], "removed": [],
                                                    "changed": ["beta"]}

    def resolve(self, name: str) -> str | None:
        if name in self.models:
            return name
        for real, status in self.models.items():
            if name in status["aliases"]:
                return real
        return None


def _error(code: str, message: str, status: int, **extra: Any) -> tuple[int, Any]:
    return status, {"error": {"code": code, "message": message, **extra}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def address_string(self) -> str:
        return "unix"

    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            self._answer(*_error("bad_request", "malformed JSON", 400))
            return
        state = self.server.state
        with state.lock:
            state.requests.append((method, self.path, body))
            hang_up = state.hang_up
        if hang_up:
            self.close_connection = True
            self.connection.shutdown(2)
            return
        try:
            self._answer(*route(state, method, self.path, body))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up waiting (a test's Ctrl-C)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")


def route(state: FakeState, method: str, target: str, body: Any) -> tuple[int, Any]:
    url = urlsplit(target)
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    parts = [unquote(p) for p in url.path.split("/") if p]
    if method == "POST" and state.deny_mutations:
        return _error("permission_denied", "uid 1234 is not allowed to change llmuxd", 403)
    if parts == ["v1", "health"]:
        return 200, {"status": "ok", "version": "9.9.9-fake", "pid": os.getpid()}
    if parts == ["v1", "status"] and method == "GET":
        with state.lock:
            return 200, {"daemon": {"pid": os.getpid(), "version": "9.9.9-fake"},
                         "gpus": [{"index": 0, "name": "Simulated H100",
                                   "total_mib": 81920, "used_mib": 38195}],
                         "models": copy.deepcopy(state.models)}
    if parts == ["v1", "reload"] and method == "POST":
        return 200, state.reload_result
    if len(parts) == 3 and parts[:2] == ["v1", "validate"] and method == "POST":
        name = state.resolve(parts[2])
        if name is None:
            return _error("model_not_found", f"unknown model '{parts[2]}'", 404, model=parts[2])
        if state.op_delay:
            time.sleep(state.op_delay)
        levels = (body or {}).get("levels") or [1, 2]
        report = validate_report(name, levels, fail_level=state.validate_fail_level)
        if (body or {}).get("verbose"):
            report["steps"] = [f"L{lv}: POST /sleep?level={lv}" for lv in levels]
        return 200, report
    if len(parts) >= 3 and parts[:2] == ["v1", "models"]:
        name = state.resolve(parts[2])
        if name is None:
            return _error("model_not_found", f"unknown model '{parts[2]}'", 404, model=parts[2])
        action = parts[3] if len(parts) > 3 else ""
        return _model_route(state, method, name, action, query, body)
    return _error("not_found", f"no route {method} {url.path}", 404)


def _model_route(state: FakeState, method: str, name: str, action: str,
                 query: dict[str, str], body: Any) -> tuple[int, Any]:
    if action == "" and method == "GET":
        with state.lock:
            return 200, copy.deepcopy(state.models[name])
    if action == "logs" and method == "GET":
        lines = int(query.get("lines", "50"))
        with state.lock:
            every = list(state.logs.get(name, []))
        return 200, {"model": name, "path": f"/var/log/llmux/{name}.log",
                     "lines": every[-lines:] if lines else []}
    if method != "POST" or action not in ("start", "sleep", "wake", "kill", "switch"):
        return _error("not_found", f"no route {method} {action}", 404)
    if action == "sleep":
        level = (body or {}).get("level")
        if level not in (1, 2, 3):
            return _error("bad_request", "level must be 1, 2 or 3", 400)
    with state.lock:
        current = state.models[name]["state"]
    if action == "wake" and current == "active":
        return _error("conflict", f"model '{name}' is already active", 409, model=name)
    if query.get("wait", "1") == "0":
        return 202, _apply(state, name, action, body, pending=True)
    if state.op_delay:
        time.sleep(state.op_delay)
    return 200, _apply(state, name, action, body, pending=False)


def _apply(state: FakeState, name: str, action: str, body: Any, pending: bool
           ) -> dict[str, Any]:
    with state.lock:
        m = state.models[name]
        m["state_since"] = time.time()
        if pending:
            m["state"] = {"sleep": "draining", "kill": "stopping", "start": "starting"
                          }.get(action, "waking")
        elif action == "sleep":
            level = (body or {})["level"]
            m.update(state="stopped" if level == 3 else "sleeping",
                     sleep_level=None if level == 3 else level,
                     pid=None if level == 3 else m["pid"], gpu_memory_mib={"0": 1331})
        elif action == "kill":
            m.update(state="stopped", sleep_level=None, pid=None, gpu_memory_mib={})
        else:
            m.update(state="active", sleep_level=None, pid=m["pid"] or 5151,
                     gpu_memory_mib={"0": 36864})
            if action == "switch":
                m["last_switch"] = {"from": "beta", "to": name, "result": "ok",
                                    "started_at": time.time(),
                                    "phases_ms": {"drain": 0.0, "sleep": 10.0, "wake": 20.0},
                                    "total_ms": 31.0}
        return copy.deepcopy(m)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, path: str, state: FakeState) -> None:
        self.state = state
        super().__init__(path, _Handler)


class FakeDaemon:
    """``with FakeDaemon(path) as fake:`` serves on ``path`` in a thread until the end."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.state = FakeState()
        self._server = _Server(path, self.state)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeDaemon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        if os.path.exists(self.path):
            os.unlink(self.path)
