"""Which upstream HTTP client for the front end: CPU per request, measured side by side.

    .venv/bin/python bench/upstream_clients.py [--aiohttp-path DIR]

One simulated child (``--sim-time-scale 0``: answers at once) and, in this process,
one event loop (uvloop, as in the worker) running 64 concurrent tasks that each
POST ``/v1/completions`` back to back through one client, then the other,
alternating for a few rounds. The number is this process's CPU (user + system) per
request: what the client costs the worker, everything else being equal. aiohttp is
not a dependency of llmux: install it anywhere (``pip install --target DIR aiohttp``)
and pass that directory. Results go in docs/benchmarks.md ("upstream client").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmux_testkit.sim import SimProcess, init_gpus
from llmuxd.proxy.upstream import UpstreamClient

BODY = json.dumps({"model": "sim/fast", "prompt": "x", "max_tokens": 1}).encode()


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def ours(port: int, n: int, conc: int) -> int:
    client = UpstreamClient()
    upstream = f"http://127.0.0.1:{port}"
    head = (b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(BODY))
    done = 0

    async def worker() -> None:
        nonlocal done
        while done < n:
            done += 1
            conn = await client.send(upstream, head + BODY, 30.0, time.monotonic() + 30)
            while await conn.read(30.0, time.monotonic() + 30):
                pass
            client.give_back(conn)

    await asyncio.gather(*(worker() for _ in range(conc)))
    client.close()
    return done


async def aio(port: int, n: int, conc: int) -> int:
    import aiohttp
    done = 0
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=conc)) as session:
        async def worker() -> None:
            nonlocal done
            while done < n:
                done += 1
                async with session.post(f"http://127.0.0.1:{port}/v1/completions", data=BODY,
                                        headers={"content-type": "application/json"}) as r:
                    async for _ in r.content.iter_any():
                        pass

        await asyncio.gather(*(worker() for _ in range(conc)))
    return done


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--aiohttp-path", default="")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.aiohttp_path:
        sys.path.insert(0, args.aiohttp_path)
    import uvloop
    tmp = Path(tempfile.mkdtemp(prefix="llmux-upstream-bench-"))
    gpus = init_gpus(tmp / "gpus")
    sim = SimProcess("sim/fast", gpu_state=gpus, time_scale=0.0, gpu_memory_utilization=0.1,
                     sleep_mode=False, dev_mode=False, fault_api=False).start()
    try:
        sim.wait_healthy(60)
        variants = {"llmux (asyncio.Protocol + httptools)": ours}
        try:
            import aiohttp  # noqa: F401
            variants["aiohttp ClientSession"] = aio
        except ImportError:
            print("aiohttp not importable: only our client measured", file=sys.stderr)
        results: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                before, t0 = cpu(), time.monotonic()
                n = uvloop.run(fn(sim.port, args.requests, 64))
                results[name].append((cpu() - before) / n * 1e6)
                print(f"{name}: {results[name][-1]:.0f} µs CPU/request, "
                      f"{n / (time.monotonic() - t0):.0f} req/s", file=sys.stderr)
        for name, values in results.items():
            print(f"| {name} | {min(values):.0f} | {sorted(values)[len(values) // 2]:.0f} |")
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
