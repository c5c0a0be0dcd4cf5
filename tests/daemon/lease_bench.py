"""Micro-benchmark: daemon CPU per lease acquire+release round trip (not a test).

Run: ``.venv/bin/python -m tests.daemon.lease_bench``. It starts a real llmuxd on the
simulator, activates one model, runs keep-alive acquire/release loops at concurrency
1 and 8, and prints the daemon's CPU time per round trip (psutil) and the client's
latency percentiles. The numbers are quoted in llmuxd/leases.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import psutil

from llmux_testkit.daemon import DaemonProcess, sim_model

ROUND_TRIPS = 3000


def _client(path: str, n: int, out: list[float]) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rb")

    def req(url: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        head = f"POST {url} HTTP/1.1\r\nContent-Length: {len(data)}\r\n\r\n"
        s.sendall(head.encode() + data)
        f.readline()
        length = 0
        while (h := f.readline()) != b"\r\n":
            if h.lower().startswith(b"content-length"):
                length = int(h.split(b":")[1])
        return json.loads(f.read(length))

    for _ in range(n):
        t = time.perf_counter()
        grant = req("/v1/leases", {"model": "a"})
        req(f"/v1/leases/{grant['lease_id']}/release", {"status": 200, "duration_ms": 1.0})
        out.append(time.perf_counter() - t)
    s.close()


def main() -> None:
    with DaemonProcess({"a": sim_model()}, env={"LLMUX_SIM_TIME_SCALE": "0.01"},
                       log_level="info") as d:
        d.request("POST", "/v1/models/a/start")
        daemon = psutil.Process(d.pid)
        for conc in (1, 8):
            lat: list[float] = []
            c0 = daemon.cpu_times()
            threads = [threading.Thread(target=_client, args=(d.socket, ROUND_TRIPS // conc, lat))
                       for _ in range(conc)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            c1 = daemon.cpu_times()
            cpu = (c1.user + c1.system) - (c0.user + c0.system)
            lat.sort()
            print(f"concurrency {conc}: {len(lat)} round trips, daemon CPU "
                  f"{cpu / len(lat) * 1e6:.0f} us each, p50 {lat[len(lat) // 2] * 1e6:.0f} us, "
                  f"p99 {lat[int(len(lat) * 0.99)] * 1e6:.0f} us")


if __name__ == "__main__":
    main()
