"""Fixtures: a fake daemon on a real Unix socket, fake children on real ports."""

from __future__ import annotations

import contextlib
import http.client
import json
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmux_testkit.sim import free_port
from llmuxd.config import Config, load_config
from llmuxd.frontend import FrontEnd

from .lease_standin import daemon  # noqa: F401 (a fixture for the lease socket's tests)
from .standins import FakeChild, FakeDaemon, FakeModel


def free_ports(n: int) -> list[int]:
    """n distinct free ports (``free_port`` never hands out the same one twice)."""
    return [free_port() for _ in range(n)]


def write_config(path: Path, port: int, models: dict[str, int], extra_proxy: str = "",
                 aliases: dict[str, list[str]] | None = None) -> Path:
    aliases = aliases or {}
    lines = [f"port = {port}", "metrics_port = 0", "[daemon]",
             f'socket = "{path.parent / "llmuxd.sock"}"', "[proxy]", 'host = "127.0.0.1"',
             "workers = 1", "threads = 8", textwrap.dedent(extra_proxy),
             "[policy]", "request_timeout_secs = 20"]
    for name, mport in models.items():
        lines += [f'[models."{name}"]', f'model_path = "org/{name}"', f"port = {mport}",
                  f"aliases = {aliases.get(name, [])!r}".replace("'", '"')]
    path.write_text("\n".join(lines) + "\n")
    return path


class Stack:
    """A fake daemon with two models served by two fake children, and a config."""

    def __init__(self, tmp: Path, extra_proxy: str = "") -> None:
        self.child_a = FakeChild("model-a")
        self.child_b = FakeChild("model-b")
        self.socket_path = str(tmp / "llmuxd.sock")
        ports = [p for p in free_ports(7) if p not in (self.child_a.port, self.child_b.port)]
        self.port = ports[0]
        self.config_path = write_config(
            tmp / "llmux.toml", self.port,
            {"model-a": self.child_a.port, "model-b": self.child_b.port,
             "model-full": ports[1], "model-failed": ports[2],
             "model-slow": ports[3], "model-gone": ports[4]},
            extra_proxy, aliases={"model-a": ["alias-a"]})
        self.config: Config = load_config(self.config_path)
        cfg = self.config.models
        self.daemon = FakeDaemon(self.socket_path, [
            FakeModel("model-a", self.child_a.port, aliases=["alias-a"]),
            FakeModel("model-b", self.child_b.port),
            FakeModel("model-full", cfg["model-full"].port,
                      refuse=(429, "queue_full", "queue of model-full is full (512)")),
            FakeModel("model-failed", cfg["model-failed"].port,
                      refuse=(503, "model_failed", "model-failed failed to start: exit 1")),
            FakeModel("model-slow", cfg["model-slow"].port,
                      refuse=(504, "timeout", "waited 20s for model-slow")),
            # No server listens on this port: the child is unreachable.
            FakeModel("model-gone", cfg["model-gone"].port),
        ])

    def __enter__(self) -> Stack:
        self.child_a.__enter__()
        self.child_b.__enter__()
        self.daemon.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.__exit__()
        self.child_b.__exit__()
        self.child_a.__exit__()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path) as s:
        yield s


def wait_http(port: int, path: str = "/health", timeout: float = 60.0,
              proc: FrontEnd | None = None) -> None:
    """Poll until 127.0.0.1:port answers ``path`` (any status); fail at the deadline."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"front end exited with {proc.poll()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
            return
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise AssertionError(f"nothing answered on :{port}{path} in {timeout}s: {last}")


@contextlib.contextmanager
def served(stack: Stack) -> Iterator[FrontEnd]:
    """A real gunicorn front end in front of ``stack``, answering /health; stopped after."""
    fe = FrontEnd(stack.config, str(stack.config_path), stack.socket_path)
    fe.start()
    try:
        wait_http(stack.port, proc=fe)
        yield fe
    finally:
        fe.stop(timeout=10)


@pytest.fixture
def gunicorn_stack(stack: Stack) -> Iterator[tuple[Stack, FrontEnd]]:
    """The fake daemon and children behind a real gunicorn front end."""
    with served(stack) as fe:
        yield stack, fe


def post(port: int, path: str, body: dict[str, object] | bytes,
         headers: dict[str, str] | None = None, timeout: float = 30
         ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, data, {"Content-Type": "application/json",
                                          **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
