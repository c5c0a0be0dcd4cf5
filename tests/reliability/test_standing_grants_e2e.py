"""Standing grants end to end (issue 11e): forced switches under concurrent load.

Real llmuxd, real gunicorn front end, simulated children (sleep level 1: a request
that reached a sleeping child would park there and be counted by the simulator's
``parked_total``). Clients ask for two models that cannot share the GPU, at random,
so the daemon switches all the time while the front end admits the active model's
requests under standing grants. Asserted: every answer is 200 and from the model
asked for, the switches happened, no child ever got a request while asleep, and no
lease is left.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import random
import threading
import time
import tomllib
from typing import Any

from llmux_testkit.daemon import sim_model, unix_request

SECS = float(os.environ.get("LLMUX_11E_SECS", "12"))
CLIENTS = 48
MODELS = ("a", "b")


def child_state(upstream: str) -> dict[str, Any]:
    if upstream.startswith("unix:"):
        status, body = unix_request(upstream[5:], "GET", "/_sim/state", timeout=30)
    else:
        host, _, port = upstream.split("//", 1)[1].rstrip("/").partition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/_sim/state")
        resp = conn.getresponse()
        status, body = resp.status, json.loads(resp.read())
        conn.close()
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def test_no_request_reaches_a_sleeping_child_under_forced_switching(make_daemon):
    models = {m: sim_model(sleep_level=1, gpu_memory_utilization=0.9) for m in MODELS}
    d = make_daemon(models, frontend=True, log_level="info",
                    config={"daemon": {"max_queue_per_model": 1024},
                            "policy": {"request_timeout_secs": 120.0},
                            "proxy": {"workers": 2}})
    port = int(tomllib.loads(d.config_path.read_text())["port"])
    stop, go = threading.Event(), threading.Event()
    statuses: collections.Counter[int] = collections.Counter()
    wrong: list[tuple[str, Any]] = []
    errors: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        go.wait(60)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=180)
        try:
            while not stop.is_set():
                # Runs of the same model: the active one's requests ride its standing
                # grants while the other's queue up and force a switch.
                model = MODELS[(seed + int(rng.random() < 0.5)) % 2]
                stream = rng.random() < 0.3
                body = json.dumps({"model": model, "max_tokens": 4, "stream": stream,
                                   "messages": [{"role": "user", "content": "hi"}]})
                try:
                    conn.request("POST", "/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    raw = resp.read()
                except (OSError, http.client.HTTPException) as exc:
                    with lock:
                        errors[type(exc).__name__] += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=180)
                    continue
                got = None
                if resp.status == 200:
                    text = raw.decode()
                    if stream:
                        first = next(line for line in text.splitlines()
                                     if line.startswith("data: {"))
                        got = json.loads(first[6:])["model"]
                    else:
                        got = json.loads(text)["model"]
                with lock:
                    statuses[resp.status] += 1
                    if resp.status == 200 and got != model:
                        wrong.append((model, got))
                    elif resp.status != 200:
                        errors[raw.decode(errors="replace")[:200]] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    switches_before = len(d.log_events("switch"))
    go.set()
    # While the load runs: leases admitted under standing grants show in the daemon's
    # table with the worker's ids (<daemon pid>-s<connection>-<n>).
    deadline = time.monotonic() + SECS
    local_seen = 0
    while time.monotonic() < deadline:
        leases = d.request("GET", "/v1/leases")[1]["leases"]
        local_seen += sum(1 for lo in leases if "-s" in lo["lease_id"])
        stop.wait(0.2)
    stop.set()
    for t in threads:
        t.join(240)
    assert not [t for t in threads if t.is_alive()], "a client never got its answer"
    switches = len(d.log_events("switch")) - switches_before
    summary = (f"statuses {dict(statuses)}, switches {switches}, errors {dict(errors)}, "
               f"standing leases seen {local_seen}")
    print("\n" + summary)
    assert set(statuses) == {200}, summary
    assert not errors, summary
    assert not wrong, wrong[:5]
    assert switches >= 2, summary
    assert local_seen, summary                    # the standing grants were used
    for name, m in d.status()["models"].items():
        if m.get("upstream") and m["state"] not in ("stopped", "failed"):
            state = child_state(m["upstream"])
            assert state["parked_total"] == 0, (name, state)
    d.wait_for(lambda: d.request("GET", "/v1/leases")[1]["leases"] == [], timeout=60,
               what="no lease left")
