"""Children reachable only by llmuxd (issue 12): a Unix socket per child in a 0700
directory by default, the served-by-our-child check, and no --host/--port/--uds in
extra_args. Real llmuxd, real simulator children, a real second user."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from llmux_testkit.daemon import UnixHTTPConnection, free_port, sim_model
from llmuxd.config import ConfigError, build_config
from tests.daemon.daemon_helpers import lease, release

UNIX = {"daemon": {"child_transport": "unix"}}


def one_model(**table: object) -> dict:
    return {"models": {"a": {"model_path": "m", **table}},
            "daemon": {"child_socket_dir": "/run/llmux/children"}}


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--port", "8001"],
                                  ["--uds", "/tmp/x.sock"], ["--host=0.0.0.0"],
                                  ["--max-model-len", "256", "--port=9"]])
def test_extra_args_may_not_choose_where_the_child_listens(args: list[str]):
    with pytest.raises(ConfigError) as err:
        build_config(one_model(port=8001, extra_args=args))
    assert len(err.value.errors) == 1, err.value.errors
    assert err.value.errors[0].startswith("models.a.extra_args: ")
    assert "llmux chooses where the child listens" in err.value.errors[0]


def test_unix_is_the_default_and_port_is_optional_then():
    cfg = build_config(one_model())
    mc = cfg.models["a"]
    assert mc.transport == "unix"
    assert mc.upstream == "unix:/run/llmux/children/a.sock"
    seed = build_config(one_model(port=8001))          # seed configs keep their port
    assert seed.models["a"].upstream.startswith("unix:")


def test_tcp_needs_a_port_and_names_it_in_the_upstream():
    with pytest.raises(ConfigError, match=r"models\.a\.port: is required"):
        build_config(one_model(transport="tcp"))
    cfg = build_config(one_model(transport="tcp", port=8001))
    assert cfg.models["a"].upstream == "http://127.0.0.1:8001"


def test_a_socket_path_too_long_for_af_unix_is_a_config_error():
    raw = one_model()
    raw["daemon"]["child_socket_dir"] = "/" + "d" * 120
    with pytest.raises(ConfigError, match="child_socket_dir"):
        build_config(raw)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A daemon dir every user may enter (like /run/llmux): the child dir's mode decides."""
    path = Path(tempfile.mkdtemp(prefix="llmux-rel-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def unix_post(path: str, url: str, body: dict) -> tuple[int, dict]:
    conn = UnixHTTPConnection(path, timeout=60)
    try:
        conn.request("POST", url, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def tcp_listeners(pids: list[int]) -> list[object]:
    found = []
    for pid in pids:
        try:
            found += [c for c in psutil.Process(pid).net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    return found


def test_unix_child_serves_through_daemon_and_front_end_and_opens_no_tcp_port(
        make_daemon, open_tmp: Path):
    d = make_daemon({"a": sim_model(sleep_level=1)}, config=UNIX, frontend=True, tmp=open_tmp)
    code, grant = lease(d, "a")
    assert code == 200, grant
    try:
        assert grant["upstream"].startswith("unix:/"), grant
        sock_path = grant["upstream"].removeprefix("unix:")
        folder = Path(sock_path).parent
        st = folder.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        code, body = unix_post(sock_path, "/v1/chat/completions", {
            "model": grant["served_model_name"], "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]})
        assert code == 200, body
    finally:
        release(d, grant["lease_id"])
    assert d.status("a")["port"] is None          # no port in use: llmuxctl shows "-"
    group = psutil.Process(d.status("a")["pid"])
    pids = [group.pid] + [p.pid for p in group.children(recursive=True)]
    assert tcp_listeners(pids) == []
    port = tomllib.loads(d.config_path.read_text())["port"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "model": "a", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
    finally:
        conn.close()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None
                    or not os.path.exists("/usr/bin/python3"),
                    reason="needs root and setpriv to act as another local user")
def test_another_local_user_cannot_reach_a_child(make_daemon, open_tmp: Path):
    d = make_daemon({"a": sim_model(sleep_level=1)}, config=UNIX, tmp=open_tmp)
    code, grant = lease(d, "a")
    assert code == 200, grant
    release(d, grant["lease_id"])
    sock_path = grant["upstream"].removeprefix("unix:")
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(3)\n")
    as_nobody = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "/usr/bin/python3", "-c", probe, sock_path],
        cwd="/", capture_output=True, text=True, timeout=60)
    assert as_nobody.returncode == 3, (as_nobody.returncode, as_nobody.stderr)
    # ...while the daemon's user can (the check above is not a broken path).
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sock_path)
    finally:
        s.close()


class _Foreign(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer()

    def _answer(self) -> None:
        body = json.dumps({"is_sleeping": False, "foreign": True}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_foreign_server_on_the_port_is_never_taken_for_the_child(make_daemon):
    """Before: the child failed to bind, the foreign /health answered 200, and llmux
    marked the model active and sent clients to the foreign server."""
    port = free_port()
    foreign = ThreadingHTTPServer(("127.0.0.1", port), _Foreign)
    server = threading.Thread(target=foreign.serve_forever, daemon=True)
    server.start()
    try:
        d = make_daemon({"a": sim_model(port=port, transport="tcp", sleep_level=1)},
                        config={"daemon": {"max_start_failures": 1}})
        code, body = lease(d, "a", timeout=60)
        assert code != 200, body
        a = d.status("a")
        assert a["state"] != "active", a
        assert "not our child" in (a["last_error"] or ""), a
    finally:
        foreign.shutdown()
        foreign.server_close()
        server.join(10)


def test_the_socket_dir_is_made_0700_and_one_owned_by_another_user_is_refused(tmp_path: Path):
    from llmuxd.child import SpawnError, prepare_socket_dir
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    prepare_socket_dir(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700
    fresh = tmp_path / "a" / "children"
    prepare_socket_dir(fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(SpawnError, match="owned by uid 65534"):
            prepare_socket_dir(theirs)
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    with pytest.raises(SpawnError):
        prepare_socket_dir(not_dir)


def test_only_a_stale_socket_is_removed_before_a_start(tmp_path: Path):
    from llmuxd.child import remove_stale_socket
    stale = tmp_path / "a.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    remove_stale_socket(str(stale))
    assert not stale.exists()
    regular = tmp_path / "b.sock"
    regular.write_text("not a socket")
    remove_stale_socket(str(regular))
    assert regular.exists()                 # never delete what is not ours to delete
    remove_stale_socket(str(tmp_path / "missing.sock"))
