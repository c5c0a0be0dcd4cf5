"""The daemon as a process: signals, orphans, reload, killed clients, many clients."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil

from llmux_testkit.daemon import sim_model

from .daemon_helpers import lease, leased_chat, release

STATES_AT_REST = {"active", "sleeping", "stopped"}


def children_of(d) -> list[int]:
    """pids of every model child the daemon runs now."""
    return [m["pid"] for m in d.status()["models"].values() if m["pid"]]


def gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def test_sigterm_exits_0_and_leaves_nothing(make_daemon):
    d = make_daemon({"a": sim_model(gpu_memory_utilization=0.4),
                     "b": sim_model(gpu_memory_utilization=0.4)})
    leased_chat(d, "a")
    leased_chat(d, "b")
    pids = children_of(d) + [p.pid for p in d.descendants()]
    assert len(children_of(d)) == 2
    assert d.stop() == 0
    assert gone(pids)
    assert not os.path.exists(d.socket)
    assert d.log_events("stopped")[-1]["exit_code"] == 0


def test_sigterm_waits_for_in_flight_leases_within_the_drain_timeout(make_daemon):
    d = make_daemon({"a": sim_model()}, config={"daemon": {"drain_timeout_secs": 30}})
    code, grant = lease(d, "a")
    assert code == 200
    d.proc.send_signal(signal.SIGTERM)
    d.wait_for(lambda: d.log_events("shutting_down"), what="shutdown to begin")
    code, body = lease(d, "a")
    assert (code, body["error"]["code"]) == (503, "shutting_down")
    assert d.proc.poll() is None          # still draining the one lease
    release(d, grant["lease_id"])
    assert d.proc.wait(60) == 0


def test_kill_9_of_llmuxd_leaves_no_child_running(make_daemon):
    d = make_daemon({"a": sim_model(gpu_memory_utilization=0.4),
                     "b": sim_model(gpu_memory_utilization=0.4)})
    leased_chat(d, "a")
    leased_chat(d, "b")
    pids = children_of(d)
    engines = [c.pid for pid in pids for c in psutil.Process(pid).children(recursive=True)]
    assert len(pids) == 2
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(30)
    d.wait_for(lambda: gone(pids + engines), timeout=60, what="children to die with llmuxd")


def test_leases_of_a_killed_client_process_are_reclaimed(make_daemon):
    d = make_daemon({"a": sim_model()})
    leased_chat(d, "a")
    script = (
        "import json, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "body = json.dumps({'model': 'a'}).encode()\n"
        "s.sendall(b'POST /v1/leases HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: '"
        " + str(len(body)).encode() + b'\\r\\n\\r\\n' + body)\n"
        "print(s.recv(65536).decode().split('\\r\\n\\r\\n', 1)[1], flush=True)\n"
        "import time; time.sleep(600)\n")
    client = subprocess.Popen([sys.executable, "-c", script, d.socket],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        line = client.stdout.readline()
        assert "lease_id" in line, line
        _code, body = d.request("GET", "/v1/leases")
        assert [x["pid"] for x in body["leases"]] == [client.pid]
        assert d.status("a")["in_flight"] == 1
        client.kill()
        client.wait(10)
        d.wait_for(lambda: d.status("a")["in_flight"] == 0, what="the lease to be reclaimed")
        assert d.request("GET", "/v1/leases")[1]["leases"] == []
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)


def test_waiter_whose_client_hangs_up_leaves_the_queue(make_daemon):
    d = make_daemon({"a": sim_model(extra_args=["--sim-fault", "slow_start=30"])})
    s = socket.socket(socket.AF_UNIX)
    s.connect(d.socket)
    body = b'{"model": "a"}'
    s.sendall(b"POST /v1/leases HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    d.wait_for(lambda: d.status("a")["queued"] == 1, what="the waiter to queue")
    s.close()
    d.wait_for(lambda: d.status("a")["queued"] == 0, what="the waiter to leave")


def test_200_concurrent_leases_across_3_models_with_forced_switching(make_daemon):
    """200 clients on 3 models that cannot share the GPU: every call is answered, the
    books balance, no switch escalates, and the daemon still works afterwards.

    Clients arrive in 8 waves of 25 and every wave asks for all three models. Wave w
    arrives once the daemon has finished w switches, so switching is forced by how the
    load is made, not by how fast this box happens to switch: each wave leaves waiters
    for a model that is not active. Earlier waves' waiters may still queue meanwhile.
    """
    models = {n: sim_model(sleep_level=lvl) for n, lvl in (("a", 1), ("b", 2), ("c", 3))}
    d = make_daemon(models, config={"policy": {"request_timeout_secs": 120}})
    rng = random.Random(7)
    waves, clients = 8, 200
    plan = [(rng.choice("abc"), i * waves // clients, rng.random() * 0.3)
            for i in range(clients)]
    for w in range(waves):                   # the seed gives every wave all three models
        assert {m for m, wave, _ in plan if wave == w} == set("abc"), w
    results: list[tuple[str, int, dict]] = []
    lock = threading.Lock()
    go = [threading.Event() for _ in range(waves)]

    def one(model: str, wave: int, delay: float) -> None:
        go[wave].wait(600)
        time.sleep(delay)                        # spread arrivals within a wave
        code, body = lease(d, model, timeout=300)
        if code == 200:
            time.sleep(rng.random() * 0.02)      # hold it briefly, like a short request
            release(d, body["lease_id"])
        with lock:
            results.append((model, code, body))

    def switches() -> int:
        return len(d.log_events("switch"))

    threads = [threading.Thread(target=one, args=p) for p in plan]
    for t in threads:
        t.start()
    try:
        for w in range(waves):
            d.wait_for(lambda w=w: switches() >= w, timeout=120,
                       what=f"{w} switches before wave {w}")
            go[w].set()
    finally:
        for event in go:                         # never leave a client thread parked
            event.set()
        for t in threads:
            t.join(600)
    assert not any(t.is_alive() for t in threads), "a lease call never returned"
    assert len(results) == clients
    for model, code, body in results:
        if code == 200:
            assert body["model"] == model
        else:
            assert body["error"]["code"] in {"timeout", "queue_full", "model_failed"}, body
    granted = sum(1 for _, code, _ in results if code == 200)
    assert granted > 0
    status = d.status()
    for m in status["models"].values():
        assert m["in_flight"] == 0 and m["queued"] == 0, m
    status = d.wait_for(lambda: (lambda s: s if all(
        m["state"] in STATES_AT_REST for m in s["models"].values()) else None)(d.status()),
        what="every model to come to rest")
    problems = [e for e in d.log_events("transition") if e["to_state"] == "stopping"]
    assert not [e for e in problems if "escalat" in e["reason"] or "wake" in e["reason"]], \
        problems
    assert d.request("GET", "/v1/leases")[1]["leases"] == []
    assert sum(1 for m in status["models"].values() if m["state"] == "active") <= 1
    assert switches() >= waves                   # the last wave forced one more, too
    leased_chat(d, "c")                          # still works afterwards
    assert d.stop() == 0


def test_sighup_reload_adds_removes_and_changes_models(make_daemon):
    d = make_daemon({"a": sim_model(), "b": sim_model()})
    leased_chat(d, "a")
    a_pid = d.status("a")["pid"]
    models = dict(d.models)
    models["c"] = sim_model()
    models["a"] = {**models["a"], "gpu_memory_utilization": 0.8}
    del models["b"]
    d.write_config(models)
    os.kill(d.pid, signal.SIGHUP)
    d.wait_for(lambda: d.log_events("reloaded"), what="the reload")
    event = d.log_events("reloaded")[-1]
    assert (event["added"], event["removed"], event["changed"]) == (["c"], ["b"], ["a"])
    code, body = d.request("GET", "/v1/models/b")
    assert code == 404 and body["error"]["code"] == "model_not_found"
    leased_chat(d, "c")
    a = d.wait_state("a", "stopped")            # changed: stopped, restarts lazily
    assert a["gpu_memory_utilization"] == 0.8
    leased_chat(d, "a")
    assert d.status("a")["pid"] != a_pid


def test_reload_with_a_bad_config_keeps_the_old_one(make_daemon):
    d = make_daemon({"a": sim_model()})
    d.config_path.write_text("bogus_key = 1\n" + d.config_path.read_text())
    code, body = d.request("POST", "/v1/reload")
    assert code == 400 and body["error"]["code"] == "bad_request", body
    assert body["error"]["errors"] == ["bogus_key: unknown key"]
    leased_chat(d, "a")


def test_reload_route_adds_a_model(make_daemon):
    d = make_daemon({"a": sim_model()})
    d.write_config({**d.models, "n": sim_model()})
    code, body = d.request("POST", "/v1/reload")
    assert code == 200 and body == {"added": ["n"], "removed": [], "changed": []}
    leased_chat(d, "n")


def test_sighup_with_a_bad_config_keeps_the_old_one(make_daemon):
    d = make_daemon({"a": sim_model()})
    d.config_path.write_text("[models.a]\nport = 'x'\n")
    os.kill(d.pid, signal.SIGHUP)
    d.wait_for(lambda: d.log_events("reload_rejected"), what="the rejection")
    assert "models.a.model_path: is required" in d.log_events("reload_rejected")[0]["errors"]
    leased_chat(d, "a")
