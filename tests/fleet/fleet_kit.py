"""A fleet on loopback: several real llmuxd boxes (simulated GPUs) behind a real HAProxy.

Each box is a ``DaemonProcess`` with its own GPU state dir, front-end port and
metrics port (fixed, so a box restarted by a test comes back on the same
address). HAProxy runs in the foreground (``-db``) in its own session with a
config written by the real ``llmuxctl fleet haproxy``; its server states are read
from its stats socket (``show stat``), so tests poll HAProxy's own view with a
deadline instead of sleeping through health-check intervals.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from llmux_testkit.daemon import DaemonProcess, free_port
from llmux_testkit.procs import stop_group

KEY = "fleet-key"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CHECK_INTER = "200ms"


def needs(tool: str, package: str) -> pytest.MarkDecorator:
    """Skip without ``tool`` on a developer's machine; in CI (CI set) its absence fails,
    so a missing install step in .ci/run cannot pass as a skip."""
    found = shutil.which(tool) is not None or Path(f"/usr/sbin/{tool}").exists()
    return pytest.mark.skipif(not found and not os.environ.get("CI"),
                              reason=f"{tool} is not installed (apt-get install {package})")


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


class Box:
    """One llmux host: a real llmuxd with its gunicorn front end and /metrics."""

    def __init__(self, name: str, models: dict[str, dict[str, Any]], tmp: Path) -> None:
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port()
        config = {"port": self.port, "metrics_port": self.metrics_port,
                  "proxy": {"host": "127.0.0.1", "workers": 1, "threads": 16,
                            "api_keys": [KEY]},
                  "policy": {"request_timeout_secs": 60.0},
                  "daemon": {"warmup": False}}
        tmp.mkdir(parents=True, exist_ok=True)
        self.daemon = DaemonProcess(models, config=config, frontend=True, tmp=tmp,
                                    log_level="info")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.daemon.start()
        wait_until(lambda: http_status(self.port, "/health") == 200, 60,
                   f"{self.name}'s front end to answer /health")

    def control(self, method: str, path: str, body: Any = None) -> Any:
        status, data = self.daemon.request(method, path, body)
        assert status == 200, (self.name, path, data)
        return data

    def state(self, model: str) -> str:
        return str(self.control("GET", f"/v1/models/{model}")["state"])

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return str(r.read().decode())

    def switches(self) -> float:
        """Switches this box has made (any result): llmux_switch_total summed."""
        return metric_sum(self.metrics(), "llmux_switch_total")

    def served(self, model: str) -> float:
        """Requests for ``model`` this box has released (llmux_requests_total)."""
        return metric_sum(self.metrics(), "llmux_requests_total", model=model)

    def wait_served(self, model: str, count: float) -> None:
        """Until ``served(model)`` reaches ``count``: the front end sends a lease's
        release after the answer, without waiting, so the count may trail the answer."""
        wait_until(lambda: self.served(model) >= count, 10,
                   f"{self.name} to count {count:g} requests for {model}")
        assert self.served(model) == count


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def http_status(port: int, path: str) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()
    except OSError:
        return None


def request(port: int, method: str, path: str, body: Any = None, key: str | None = KEY,
            raw: bytes | None = None, timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, lower-cased headers, raw body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    try:
        conn.request(method, path, data, headers)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
    finally:
        conn.close()


def chat(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "temperature": 0, "seed": 7, "max_tokens": 8, "stream": stream,
            "messages": [{"role": "user", "content": "Name a colour."}]}


class HAProxy:
    """A real haproxy in the foreground, its config generated by llmuxctl fleet haproxy."""

    def __init__(self, boxes: list[Box], tmp: Path) -> None:
        self.boxes = boxes
        self.port = free_port()
        self.tmp = tmp
        self.config_path = tmp / "haproxy.cfg"
        self.stats_path = tmp / "haproxy.sock"
        self.log_path = tmp / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def generate(self) -> str:
        """Run the real generator against the live boxes; add a stats socket for the test."""
        args = [sys.executable, "-m", "llmuxctl", "fleet", "haproxy",
                *[b.address for b in self.boxes], "--bind", f"127.0.0.1:{self.port}",
                "--check-inter", CHECK_INTER, "-o", str(self.config_path)]
        env = {**os.environ, "LLMUX_API_KEY": KEY}
        r = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        text = self.config_path.read_text()
        text = text.replace("    log /dev/log local0\n",
                            f"    stats socket {self.stats_path} mode 600 level admin\n", 1)
        self.config_path.write_text(text)
        return text

    def start(self) -> None:
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.config_path)],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        out = open(self.log_path, "ab")  # noqa: SIM115 (kept by the child)
        try:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config_path)],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            out.close()
        wait_until(lambda: self._alive() and self.stats_path.exists()
                   and http_status(self.port, "/health") == 200, 30,
                   "haproxy to serve /health")

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.proc.returncode}:\n"
                                 + self.log_path.read_text(errors="replace")[-3000:])
        return True

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_group(self.proc)

    def stats(self) -> dict[tuple[str, str], str]:
        """{(backend, server): status} from the stats socket (UP, DOWN, MAINT, no check...)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.stats_path))
            s.sendall(b"show stat\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        text = b"".join(chunks).decode().lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {(r["pxname"], r["svname"]): r["status"].split()[0] for r in rows
                if r["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_servers(self, want: dict[tuple[str, str], str], timeout: float = 30.0) -> None:
        """Poll HAProxy's view until every (backend, server) has the wanted status."""
        def matches() -> bool:
            self._alive()
            have = self.stats()
            return all(have.get(k) == v for k, v in want.items())
        try:
            wait_until(matches, timeout, f"haproxy to see {want}")
        except AssertionError:
            raise AssertionError(f"haproxy still shows {self.stats()}, wanted {want}") from None
