"""The HAProxy example and its generator: the shipped file is the generator's output.

The routing itself is proven with a running HAProxy in test_fleet.py; these pin
the config's shape (what a reader of etc/fleet/haproxy.cfg relies on) and the
generator's handling of what boxes report.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from llmuxctl.cli import main
from llmuxctl.fleet import Box, FleetError, Options, render

from .fleet_kit import needs

EXAMPLE = Path(__file__).resolve().parents[2] / "etc/fleet/haproxy.cfg"
EXAMPLE_BOXES = [
    Box("box1", "10.0.0.1:3000", {"Qwen/Qwen3-14B": ["qwen-14b"], "gemma-12b": []}),
    Box("box2", "10.0.0.2:3000", {"Qwen/Qwen3-14B": ["qwen-14b"], "llama-8b": []}),
    Box("box3", "10.0.0.3:3000", {"gemma-12b": [], "e5-embed": []}),
]
EXAMPLE_OPTIONS = Options(command="llmuxctl fleet haproxy 10.0.0.1:3000 10.0.0.2:3000 "
                                  "10.0.0.3:3000")
needs_haproxy = needs("haproxy", "haproxy")


def test_the_shipped_example_is_the_generators_output() -> None:
    text = render(EXAMPLE_BOXES, EXAMPLE_OPTIONS)
    if os.environ.get("LLMUX_REGEN"):
        EXAMPLE.write_text(text)
    assert EXAMPLE.read_text() == text, "regenerate: LLMUX_REGEN=1 pytest " + __file__


@needs_haproxy
def test_haproxy_accepts_the_example() -> None:
    r = subprocess.run(["haproxy", "-c", "-f", str(EXAMPLE)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Configuration file is valid" in r.stdout + r.stderr


def section(text: str, head: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(head)
    out = []
    for line in lines[start + 1:]:
        if not line.startswith("    "):
            break
        out.append(line.strip())
    return out


def test_each_model_backend_checks_readiness_and_falls_back_to_one_box() -> None:
    text = EXAMPLE.read_text()
    qwen = section(text, "backend model_Qwen_Qwen3-14B")
    assert "http-check send meth GET uri /v1/models/Qwen/Qwen3-14B/ready" in qwen
    assert "http-check expect status 200" in qwen
    assert [s for s in qwen if s.startswith("server ")] == [
        "server box1 10.0.0.1:3000 check",
        "server box2 10.0.0.2:3000 check",
        "server box1-any 10.0.0.1:3000 backup track any_box/box1",
        "server box2-any 10.0.0.2:3000 backup track any_box/box2",
    ]
    assert not any("allbackups" in line for line in text.splitlines()
                   if not line.lstrip().startswith("#"))
    front = section(text, "frontend llmux")
    assert "option http-buffer-request" in front
    assert ("use_backend model_Qwen_Qwen3-14B if { var(txn.model) -m str Qwen/Qwen3-14B "
            "qwen-14b }") in front
    assert "default_backend any_box" in front
    assert "http-check send meth GET uri /health" in section(text, "backend any_box")


def test_fallback_order_rotates_so_misses_spread_over_boxes() -> None:
    boxes = [Box("box1", "h1:1", {"m1": [], "m2": []}), Box("box2", "h2:1", {"m1": [], "m2": []})]
    text = render(boxes, Options())
    first_backup = {b: next(s for s in section(text, f"backend model_{b}") if " backup " in s)
                    for b in ("m1", "m2")}
    assert first_backup == {"m1": "server box1-any h1:1 backup track any_box/box1",
                            "m2": "server box2-any h2:1 backup track any_box/box2"}


def test_names_haproxy_cannot_match_are_refused() -> None:
    with pytest.raises(FleetError, match="cannot be matched"):
        render([Box("box1", "h:1", {"has space": []})], Options())


def test_backend_names_stay_distinct() -> None:
    text = render([Box("box1", "h:1", {"a/b": [], "a_b": []})], Options())
    assert "backend model_a_b\n" in text and "backend model_a_b_2\n" in text


class _Models(BaseHTTPRequestHandler):
    answer: dict[str, Any] = {}
    seen_auth: list[str | None] = []

    def do_GET(self) -> None:
        self.seen_auth.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != "Bearer k":
            self.send_response(401)
            self.end_headers()
            return
        body = json.dumps(self.answer).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def box_server() -> Iterator[str]:
    _Models.answer = {"object": "list", "data": [
        {"id": "m", "llmux": {"alias_of": None}},
        {"id": "m-alias", "llmux": {"alias_of": "m"}},
        {"id": "n", "llmux": {"alias_of": None}}]}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_the_cli_reads_each_box_with_the_key(box_server: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["fleet", "haproxy", box_server, "--api-key", "k"], out=out, err=err) == 0, \
        err.getvalue()
    text = out.getvalue()
    assert "use_backend model_m if { var(txn.model) -m str m m-alias }" in text
    assert f"server box1 {box_server} check" in section(text, "backend model_n")


def test_the_cli_says_which_box_failed_and_why(box_server: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMUX_API_KEY", raising=False)
    out, err = io.StringIO(), io.StringIO()
    assert main(["fleet", "haproxy", box_server], out=out, err=err) == 1
    assert err.getvalue() == (f"llmuxctl: {box_server}: GET /v1/models answered 401 "
                              "(pass --api-key or set LLMUX_API_KEY)\n")
    assert out.getvalue() == ""
    assert main(["fleet", "haproxy", "nohostport"], out=out, err=err) == 1
    assert "'nohostport' is not HOST:PORT" in err.getvalue()
