"""Control API routes, sd_notify and metrics of a running daemon."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

from llmux_testkit.daemon import free_port, sim_model

from .daemon_helpers import lease, leased_chat, release


def test_unknown_route_model_and_bad_json_get_the_error_shape(make_daemon):
    d = make_daemon({"a": sim_model(aliases=["alpha"])})
    code, body = d.request("GET", "/v1/nope")
    assert (code, body["error"]["code"]) == (404, "not_found")
    code, body = d.request("GET", "/v1/models/zzz")
    assert (code, body["error"]) == (404, {"code": "model_not_found",
                                           "message": "unknown model 'zzz'", "model": "zzz"})
    code, body = d.request("POST", "/v1/leases", {"nomodel": 1})
    assert (code, body["error"]["code"]) == (400, "bad_request")
    code, body = d.request("POST", "/v1/leases/xyz/release", {})
    assert (code, body["error"]["code"]) == (404, "not_found")
    code, body = d.request("GET", "/v1/models/alpha")       # alias
    assert code == 200 and body["name"] == "a"


def test_start_sleep_wake_kill_routes_and_logs(make_daemon):
    d = make_daemon({"a": sim_model(sleep_level=2), "b": sim_model()})
    code, body = d.request("POST", "/v1/models/a/start")
    assert (code, body["state"]) == (200, "active")
    code, body = d.request("POST", "/v1/models/a/sleep", {"level": 1})
    assert (code, body["state"], body["sleep_level"]) == (200, "sleeping", 1)
    code, body = d.request("POST", "/v1/models/a/wake")
    assert (code, body["state"]) == (200, "active")
    assert body["last_switch"]["phases_ms"].get("wake") is not None
    code, body = d.request("POST", "/v1/models/b/switch")
    assert (code, body["state"]) == (200, "active")
    assert d.status("a")["state"] == "sleeping" and d.status("a")["sleep_level"] == 2
    code, body = d.request("POST", "/v1/models/b/sleep", {"level": 7})
    assert (code, body["error"]["code"]) == (400, "bad_request")
    code, body = d.request("POST", "/v1/models/b/kill?wait=0")
    assert code == 202
    d.wait_state("b", "stopped")
    code, body = d.request("GET", "/v1/models/a/logs?lines=5")
    assert code == 200 and len(body["lines"]) == 5 and body["path"].endswith("a.log")


def test_validate_route_runs_levels_and_returns_to_active(make_daemon):
    d = make_daemon({"a": sim_model(sleep_level=1), "b": sim_model(sleep_level=1)})
    leased_chat(d, "b")
    code, report = d.request("POST", "/v1/validate/a", {"levels": [1, 2], "verbose": True})
    assert code == 200, report
    assert report["passed"] is True, report
    assert "L1: POST /sleep?level=1" in report["steps"]
    assert [r["level"] for r in report["rows"]] == [1, 2]
    assert d.status("a")["state"] == "active"
    assert d.status("b")["state"] == "sleeping"
    leased_chat(d, "a")


def test_sd_notify_ready_status_watchdog_stopping(make_daemon, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    seen: list[str] = []
    done = threading.Event()

    def read() -> None:
        """Read every datagram as it comes, like systemd: an unread socket holds only 10
        (net.unix.max_dgram_qlen), and then the daemon's next send would wait for us."""
        while not done.is_set():
            try:
                seen.append(sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def collect(pred) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(pred(m) for m in list(seen)):
                return True
            time.sleep(0.05)
        return False

    try:
        d = make_daemon({"a": sim_model()},
                        env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        leased_chat(d, "a")
        assert collect(lambda m: "READY=1" in m)
        assert collect(lambda m: m == "WATCHDOG=1")
        assert collect(lambda m: "STATUS=active: a" in m)
        assert d.stop() == 0
        assert collect(lambda m: "STOPPING=1" in m)
    finally:
        done.set()
        reader.join(10)
        sock.close()


def test_metrics_are_served_with_the_original_names(make_daemon):
    port = free_port()
    d = make_daemon({"a": sim_model(), "b": sim_model()}, config={"metrics_port": port})
    leased_chat(d, "a")
    leased_chat(d, "b")
    code, grant = lease(d, "b")
    assert code == 200
    release(d, grant["lease_id"], status=200)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return r.read().decode()
    active_b = 'llmux_model_state{model="b",state="active"} 1.0'
    text = d.wait_for(lambda: (lambda t: t if active_b in t else None)(scrape()),
                      what="the state gauges")
    assert 'llmux_switch_total{from="a",result="ok",to="b"} 1.0' in text
    assert 'llmux_switch_phase_seconds_count{phase="sleep"}' in text
    assert 'llmux_requests_total{model="b",status="200"}' in text
    assert "llmux_request_queue_wait_seconds_bucket" in text
    assert 'llmux_model_state{model="a",state="active"} 0.0' in text
    d.wait_for(lambda: "llmux_gpu_memory_used_mib{" in scrape(), what="GPU gauge")


def test_a_sleeper_that_takes_almost_the_whole_gpu_can_wake(make_daemon):
    # 0.99 of the GPU: the sleeper's own residue must count as free when it wakes.
    d = make_daemon({"a": sim_model(sleep_level=1, gpu_memory_utilization=0.99)})
    assert d.request("POST", "/v1/models/a/start")[1]["state"] == "active"
    assert d.request("POST", "/v1/models/a/sleep", {"level": 1})[1]["state"] == "sleeping"
    code, body = d.request("POST", "/v1/models/a/wake")
    assert (code, body["state"]) == (200, "active"), body
