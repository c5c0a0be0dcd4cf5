"""Run benchmarks P1-P4 (with P3b and A1) in one go and write docs/benchmarks.md.

    .venv/bin/python bench/run.py            # full run (a few minutes)
    .venv/bin/python bench/run.py --quick    # smaller counts, for a smoke test

A real llmuxd (with its gunicorn front end) starts on a temp config with simulated
children; Debian's nginx proxies to the same children. Every measurement runs the
three targets — direct to the child, through llmux, through nginx — interleaved
round by round with the same load generator, and every ratio is against the
baseline measured in the same run. Loopback only; every loop is bounded in count
and in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
# llmux_testkit/ lives in the checkout, not in the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loadgen import Result, percentile, run_load
from nginx import Nginx, find_nginx

from llmux_testkit.daemon import DaemonProcess, free_port, sim_model
from llmuxd.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- BEGIN RESULTS (bench/run.py) -->", "<!-- END RESULTS -->"

FAST_ARGS = ["--sim-time-scale", "0"]
STREAM_ARGS = ["--sim-token-rate", "100", "--sim-ttft-s", "0", "--sim-load-s", "0",
               "--sim-warmup-s", "0"]
# P3b's steady state: 1,024 streams at this many tokens/s each relay as many chunks
# per second in all as P3's 256 at 100 (a box serving 1,024 streams at once gives
# each fewer tokens/s; at 100 each, this 2-core box cannot feed even direct).
P3B_STEADY_RATE = 25
SWITCH_ARGS = ["--sim-time-scale", "0.05", "--sim-ttft-s", "0", "--sim-token-rate", "0"]


def fast_model() -> dict[str, Any]:
    """The `fast` child: answers at once (P1, P2, A1)."""
    return sim_model(model_path="sim/fast-1b", gpu_memory_utilization=0.15, sleep_level=1,
                     extra_args=FAST_ARGS)


def stream_model(token_rate: int = 100) -> dict[str, Any]:
    """The `stream` child: one token every 10 ms (P3, P3b, the lone stream); at
    ``token_rate`` tokens/s for P3b's steady state."""
    args = list(STREAM_ARGS)
    args[args.index("--sim-token-rate") + 1] = str(token_rate)
    return sim_model(model_path="sim/stream-1b", gpu_memory_utilization=0.15,
                     sleep_level=1, extra_args=args)


@dataclass
class Target:
    name: str
    port: int
    model: str


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def llmux_pids(daemon: DaemonProcess) -> list[int]:
    """The daemon and its own helpers (gunicorn master and workers, the guardian), not
    the model children (``... serve``) and their engine processes."""
    pids = [daemon.pid]
    for p in psutil.Process(daemon.pid).children():
        try:
            cmd = " ".join(p.cmdline())
            if " serve " in cmd:
                continue
            pids.append(p.pid)
            pids += [c.pid for c in p.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return pids


def wait_http(port: int, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing healthy on :{port}{path}")
        time.sleep(0.1)


def metric_sum(port: int, operation: str) -> float:
    """sum of vllm:sleep_mode_operation_duration_seconds{operation=...} (0 if absent)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    pat = re.compile(r'^vllm:sleep_mode_operation_duration_seconds_sum\{[^}]*operation="'
                     + re.escape(operation) + r'"[^}]*\}\s+([0-9.eE+-]+)', re.M)
    return sum(float(m.group(1)) for m in pat.finditer(text))


def ms(x: float) -> str:
    return f"{x * 1000:.2f}"


# ---------------------------------------------------------------------------
# The four measurements


def p1_latency(targets: list[Target], rounds: int, per_round: int) -> dict[str, list[float]]:
    lat: dict[str, list[float]] = {t.name: [] for t in targets}
    for r in range(rounds):
        for t in targets[r % len(targets):] + targets[:r % len(targets)]:
            body = {"model": t.model, "prompt": "hello", "max_tokens": 8}
            results, _ = run_load(t.port, "/v1/completions", body, 1, per_round, 30.0)
            lat[t.name] += [x.latency for x in results if x.ok]
    return lat


def p2_throughput(targets: list[Target], rounds: int, max_requests: int, seconds: float,
                  cpu_pids: dict[str, Any]) -> dict[str, dict[str, float]]:
    acc: dict[str, dict[str, float]] = {t.name: {"ok": 0, "fail": 0, "wall": 0.0, "cpu": 0.0}
                                        for t in targets}
    for r in range(rounds):
        for t in targets[r % len(targets):] + targets[:r % len(targets)]:
            pids = cpu_pids[t.name]() if t.name in cpu_pids else []
            part = cpu_pids[t.name + ":daemon"]() if t.name + ":daemon" in cpu_pids else []
            before, part_before = cpu_seconds(pids), cpu_seconds(part)
            body = {"model": t.model, "prompt": "hello", "max_tokens": 8}
            results, wall = run_load(t.port, "/v1/completions", body, 64, max_requests, seconds)
            after, part_after = cpu_seconds(pids), cpu_seconds(part)
            a = acc[t.name]
            a["cpu_part"] = a.get("cpu_part", 0.0) + part_after - part_before
            a["ok"] += sum(1 for x in results if x.ok)
            a["fail"] += sum(1 for x in results if not x.ok)
            a["wall"] += wall
            a["cpu"] += after - before
    for a in acc.values():
        a["rps"] = a["ok"] / a["wall"] if a["wall"] else 0.0
        a["cpu_us_per_req"] = a["cpu"] / a["ok"] * 1e6 if a["ok"] else float("nan")
        a["daemon_us_per_req"] = (a.get("cpu_part", 0.0) / a["ok"] * 1e6 if a["ok"]
                                  else float("nan"))
    return acc


def p3_streams(targets: list[Target], rounds: int, streams: int, chunks: int,
               per_client: int, stagger: float) -> dict[str, dict[str, float]]:
    """``streams`` clients, each running ``per_client`` streams back to back.

    With ``stagger`` = one stream's duration the first starts are spread out and the
    load is a steady 256 open streams; with 0 all start at once (a burst)."""
    acc: dict[str, dict[str, Any]] = {t.name: {"ttfc": [], "events": 0, "busy": 0.0,
                                               "fail": 0, "n": 0} for t in targets}
    for r in range(rounds):
        for t in targets[r % len(targets):] + targets[:r % len(targets)]:
            body = {"model": t.model, "prompt": "hello", "max_tokens": chunks, "stream": True,
                    "ignore_eos": True}
            results, _ = run_load(t.port, "/v1/completions", body, streams,
                                  streams * per_client, 120.0, timeout=110.0, stagger=stagger)
            a = acc[t.name]
            a["n"] += len(results)
            a["fail"] += sum(1 for x in results if not x.ok or x.events < chunks)
            a["ttfc"] += [x.first_chunk for x in results if x.first_chunk is not None]
            a["events"] += sum(x.events for x in results)
            a["busy"] += sum(x.latency for x in results if x.ok)
    out: dict[str, dict[str, float]] = {}
    for name, a in acc.items():
        # Chunk rate per open stream (events over the time streams were open), times
        # the streams held open: what the target delivers at this concurrency.
        rate = a["events"] / a["busy"] * streams if a["busy"] else 0.0
        out[name] = {"ttfc_p50": percentile(a["ttfc"], 50), "ttfc_p99": percentile(a["ttfc"], 99),
                     "chunk_rate": rate, "fail": a["fail"], "n": a["n"]}
    return out


def a1_stalled(port: int, model: str, stalled: int, per_round: int, rounds: int
               ) -> dict[str, Any]:
    """Requests at concurrency 1 with no other load, then with ``stalled`` connections
    that sent half a request head and stopped, alternating, in one run: the ratio of
    the p50s is what the abuse target is checked on."""
    import socket
    body = {"model": model, "prompt": "x", "max_tokens": 1}
    lat: dict[str, list[float]] = {"unloaded": [], "stalled": []}
    opened = 0
    for _ in range(rounds):
        results, _ = run_load(port, "/v1/completions", body, 1, per_round, 60.0)
        lat["unloaded"] += [x.latency for x in results if x.ok]
        socks = []
        try:
            for _ in range(stalled):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")
                socks.append(s)
            opened = max(opened, len(socks))
            results, _ = run_load(port, "/v1/completions", body, 1, per_round, 60.0)
            lat["stalled"] += [x.latency for x in results if x.ok]
        finally:
            for s in socks:
                s.close()
    p50 = {k: percentile(v, 50) for k, v in lat.items()}
    return {"n": {k: len(v) for k, v in lat.items()}, "p50": p50, "opened": opened,
            "ratio": p50["stalled"] / p50["unloaded"] if p50["unloaded"] else float("nan")}


def lone_stream(targets: list[Target], chunks: int) -> dict[str, dict[str, float]]:
    out = {}
    for t in targets:
        body = {"model": t.model, "prompt": "hello", "max_tokens": chunks, "stream": True,
                    "ignore_eos": True}
        results, _ = run_load(t.port, "/v1/completions", body, 1, 1, 60.0, track_arrivals=True)
        res = results[0] if results else Result()
        gaps = [b - a for a, b in zip(res.arrivals, res.arrivals[1:], strict=False)]
        out[t.name] = {"events": res.events, "reads": len(res.arrivals),
                       "gap_p50": percentile(gaps, 50), "gap_max": max(gaps, default=0.0)}
    return out


def p4_switches(daemon: DaemonProcess, port: int, models: dict[str, int], switches: int,
                deadline: float) -> list[dict[str, float]]:
    names = list(models)
    rows = []
    # Start both models (cold starts are not switches), ending with the first active.
    for name in (names[0], names[1], names[0]):
        run_load(port, "/v1/completions", {"model": name, "prompt": "x", "max_tokens": 1},
                 1, 1, 120.0, timeout=110.0)
    for i in range(switches):
        if time.monotonic() > deadline:
            break
        target, other = names[(i + 1) % 2], names[i % 2]
        held = wait_out_quantum(daemon, other)
        before = {m: (metric_sum(p, "sleep"), metric_sum(p, "wake")) for m, p in models.items()}
        results, wall = run_load(port, "/v1/completions",
                                 {"model": target, "prompt": "x", "max_tokens": 1}, 1, 1,
                                 120.0, timeout=110.0)
        after = {m: (metric_sum(p, "sleep"), metric_sum(p, "wake")) for m, p in models.items()}
        sleep_s = after[other][0] - before[other][0]
        wake_s = after[target][1] - before[target][1]
        ok = bool(results) and results[0].ok
        total = results[0].latency if ok else wall
        last = daemon.status(target).get("last_switch") or {}
        phases = {k: round(float(v), 1) for k, v in (last.get("phases_ms") or {}).items()
                  if v}
        rows.append({"ok": float(ok), "total": total, "sleep": sleep_s, "wake": wake_s,
                     "overhead": total - sleep_s - wake_s,
                     "daemon_total_ms": float(last.get("total_ms") or 0.0),
                     "phases": phases, "quantum_wait": held})
    return rows


def wait_out_quantum(daemon: DaemonProcess, active: str) -> float:
    """Idle until the policy lets ``active`` leave; returns the seconds idled.

    The default policy (fifo) keeps a model that was switched in ACTIVE for at least
    as long as that switch took (``switched_in_secs`` = its last switch's total minus
    the drain): deliberate policy time, so that back-to-back switches cannot take
    more than half of a contended GPU. P4 measures what a switch costs, not the
    policy's quantum, so each measured request is sent once that quantum is over
    (from the daemon's own record of the switch, plus 5 ms). Before this, P4's
    requests came 10-30 ms after the previous switch and waited out the rest of the
    quantum inside the daemon: 40-70 ms counted as "overhead" (docs/benchmarks.md).
    """
    last = daemon.status(active).get("last_switch") or {}
    total_ms = last.get("total_ms")
    if last.get("to") != active or total_ms is None:
        return 0.0
    ended = float(last["started_at"]) + total_ms / 1000
    quantum = (total_ms - float((last.get("phases_ms") or {}).get("drain", 0.0))) / 1000
    held = max(0.0, ended + quantum + 0.005 - time.time())
    time.sleep(held)   # not a synchronisation: the policy's time limit, known in advance
    return held


# ---------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    ap.add_argument("--no-doc", action="store_true", help="print only, do not write the doc")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=256,
                    help="[proxy] threads (unused by the asyncio worker; kept for the key)")
    ap.add_argument("--p4-only", type=int, metavar="N", default=0,
                    help="run only P4 with N switches (two models, no front-end load) "
                         "and print its table; the doc is not written")
    ap.add_argument("--p2-only", type=int, metavar="ROUNDS", default=0,
                    help="run only P2 against llmux (one `fast` model), ROUNDS rounds of "
                         "20,000 requests (4 s cap), and print one JSON line per round "
                         "(CPU µs per request: all llmux, llmuxd, front end); for A/B "
                         "runs of the front end's CPU; the doc is not written")
    ap.add_argument("--p1-only", type=int, metavar="ROUNDS", default=0,
                    help="run only P1 (direct and llmux, interleaved), ROUNDS rounds of "
                         "300 requests each, one JSON line per round (added p50/p99 ms); "
                         "the doc is not written")
    ap.add_argument("--p3b-only", type=int, metavar="ROUNDS", default=0,
                    help="run only P3b (1,024 streams at once, direct and llmux), ROUNDS "
                         "rounds, one JSON line per round; the doc is not written")
    ap.add_argument("--p3-only", type=int, metavar="ROUNDS", default=0,
                    help="the same for P3's steady state (256 streams open throughout)")
    ap.add_argument("--p3b-steady-only", type=int, metavar="ROUNDS", default=0,
                    help="1,024 streams open throughout (25 tokens/s each: P3's aggregate "
                         "chunk rate), direct, llmux and nginx interleaved, with the CPU "
                         "of the proxy and of the simulated child per relayed chunk; the "
                         "doc is not written")
    args = ap.parse_args()
    if args.p3b_steady_only:
        return p3b_steady_only(args.p3b_steady_only, args.workers)
    if args.p1_only:
        return p1_only(args.p1_only, args.workers)
    if args.p3b_only:
        return p3b_only(args.p3b_only, args.workers)
    if args.p3_only:
        return p3b_only(args.p3_only, args.workers, steady=True)
    if args.p4_only:
        return p4_only(args.p4_only, args.workers)
    if args.p2_only:
        return p2_only(args.p2_only, args.workers)
    q = args.quick
    started = time.monotonic()
    loadavg = os.getloadavg()
    hard_deadline = started + (240 if q else 600)

    models = {
        "fast": fast_model(),
        "stream": stream_model(),
        "stream-25": stream_model(P3B_STEADY_RATE),
        "sw-a": sim_model(model_path="sim/qwen-7b", gpu_memory_utilization=0.6,
                          sleep_level=1, extra_args=SWITCH_ARGS),
        "sw-b": sim_model(model_path="sim/llama-8b", gpu_memory_utilization=0.6,
                          sleep_level=1, extra_args=SWITCH_ARGS),
    }
    config = {"proxy": {"host": "127.0.0.1", "workers": args.workers, "threads": args.threads},
              "policy": {"request_timeout_secs": 120.0},
              "daemon": {"max_queue_per_model": 4096}}
    nginx_bin = find_nginx()
    tmp = Path(tempfile.mkdtemp(prefix="llmux-bench-"))
    report: dict[str, Any] = {}
    (tmp / "llmux").mkdir()
    with DaemonProcess(models, config=config, frontend=True, tmp=tmp / "llmux",
                       log_level="warning") as daemon:
        port = load_config(daemon.config_path).port
        wait_http(port, "/health", 60)
        for m in ("fast", "stream", "stream-25"):
            res, _ = run_load(port, "/v1/completions", {"model": m, "prompt": "x",
                                                        "max_tokens": 1}, 1, 1, 120.0, 110.0)
            if not res or not res[0].ok:
                raise SystemExit(f"could not start model {m} through llmux: {res}")
        fast_port, stream_port = models["fast"]["port"], models["stream"]["port"]
        nginx = None
        fast_targets = [Target("direct", fast_port, "fast"), Target("llmux", port, "fast")]
        stream_targets = [Target("direct", stream_port, "stream"),
                          Target("llmux", port, "stream")]
        slow_port = models["stream-25"]["port"]
        slow_targets = [Target("direct", slow_port, "stream-25"),
                        Target("llmux", port, "stream-25")]
        if nginx_bin:
            n_fast, n_stream, n_slow = free_port(), free_port(), free_port()
            nginx = Nginx(nginx_bin, tmp / "nginx", {n_fast: fast_port, n_stream: stream_port,
                                                    n_slow: slow_port})
            nginx.start()
            fast_targets.append(Target("nginx", n_fast, "fast"))
            stream_targets.append(Target("nginx", n_stream, "stream"))
            slow_targets.append(Target("nginx", n_slow, "stream-25"))
        else:
            print("nginx not found (apt-get install nginx-light): nginx target skipped",
                  file=sys.stderr)
        try:
            cpu_pids = {"llmux": lambda: llmux_pids(daemon),
                        "llmux:daemon": lambda: [daemon.pid]}
            if nginx is not None:
                cpu_pids["nginx"] = nginx.pids
            # Warm every path (connections, imports) before measuring.
            p1_latency(fast_targets, len(fast_targets), 50)
            print("P1 ...", file=sys.stderr)
            report["p1"] = p1_latency(fast_targets, 6 if not q else 3, 300 if not q else 100)
            print("P2 ...", file=sys.stderr)
            report["p2"] = p2_throughput(fast_targets, 3 if not q else 1,
                                         20000 if not q else 3000, 4.0 if not q else 2.0,
                                         cpu_pids)
            print("P3 ...", file=sys.stderr)
            n_streams, n_chunks = (256, 200) if not q else (64, 50)
            report["p3"] = p3_streams(stream_targets, 2 if not q else 1, n_streams, n_chunks,
                                      per_client=2, stagger=n_chunks * 0.010)
            print("P3 burst ...", file=sys.stderr)
            report["p3_burst"] = p3_streams(stream_targets, 1, n_streams, n_chunks,
                                            per_client=1, stagger=0.0)
            print("P3b ...", file=sys.stderr)
            report["p3b"] = p3_streams(stream_targets, 1, 1024 if not q else 128, n_chunks,
                                       per_client=1, stagger=0.0)
            report["p3b_duration"] = n_chunks * 0.010
            print("P3b steady ...", file=sys.stderr)
            slow_duration = n_chunks / P3B_STEADY_RATE
            report["p3b_steady"] = p3_streams(slow_targets, 1, 1024 if not q else 128,
                                              n_chunks, per_client=2, stagger=slow_duration)
            report["p3b_steady_duration"] = slow_duration
            print("A1 ...", file=sys.stderr)
            report["a1"] = a1_stalled(port, "fast", 1000 if not q else 100,
                                      200 if not q else 50, 3 if not q else 1)
            report["lone"] = lone_stream(stream_targets, 50)
            print("P4 ...", file=sys.stderr)
            report["p4"] = p4_switches(daemon, port, {"sw-a": models["sw-a"]["port"],
                                                      "sw-b": models["sw-b"]["port"]},
                                       10 if not q else 4, hard_deadline)
        finally:
            if nginx is not None:
                nginx.stop()
    report["seconds"] = time.monotonic() - started
    report["config"] = {"workers": args.workers, "threads": args.threads, "quick": q,
                        "nginx": nginx_bin is not None, "loadavg": loadavg}
    text = render(report)
    print(text)
    (tmp / "report.json").write_text(json.dumps(report, default=str, indent=1))
    if not args.no_doc and not q:
        write_doc(text)
        print(f"wrote {DOC}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _bench_daemon(models: dict[str, dict[str, Any]], workers: int,
                  prefix: str) -> Iterator[tuple[DaemonProcess, int]]:
    """llmuxd with its front end on ``models`` (the single-measurement modes' setup):
    the daemon and the front end's port, once /health answers."""
    config = {"proxy": {"host": "127.0.0.1", "workers": workers},
              "policy": {"request_timeout_secs": 120.0},
              "daemon": {"max_queue_per_model": 4096}}
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    with DaemonProcess(models, config=config, frontend=True, tmp=tmp,
                       log_level="warning") as daemon:
        port = load_config(daemon.config_path).port
        wait_http(port, "/health", 60)
        yield daemon, port


def p4_only(switches: int, workers: int) -> int:
    """P4 alone, on the same two models and config as the full run (quicker to bisect)."""
    models = {"sw-a": sim_model(model_path="sim/qwen-7b", gpu_memory_utilization=0.6,
                                sleep_level=1, extra_args=SWITCH_ARGS),
              "sw-b": sim_model(model_path="sim/llama-8b", gpu_memory_utilization=0.6,
                                sleep_level=1, extra_args=SWITCH_ARGS)}
    with _bench_daemon(models, workers, "llmux-bench-p4-") as (daemon, port):
        rows = p4_switches(daemon, port, {m: t["port"] for m, t in models.items()},
                           switches, time.monotonic() + 300)
    print("\n".join(_p4_lines(rows)))
    return 0


def p2_only(rounds: int, workers: int) -> int:
    """P2 alone against llmux, one line per round: quick A/B runs of the CPU per request
    (run a base checkout with PYTHONPATH pointing at it, from outside the checkout, and
    alternate; the box is shared, so compare medians of several rounds)."""
    models = {"fast": fast_model()}
    with _bench_daemon(models, workers, "llmux-bench-p2-") as (daemon, port):
        target = Target("llmux", port, "fast")
        p1_latency([target], 1, 200)  # start the model, warm connections
        cpu_pids = {"llmux": lambda: llmux_pids(daemon), "llmux:daemon": lambda: [daemon.pid]}
        for r in range(rounds):
            a = p2_throughput([target], 1, 20000, 4.0, cpu_pids)["llmux"]
            print(json.dumps({"round": r, "loadavg": round(os.getloadavg()[0], 2),
                              "rps": round(a["rps"]), "fail": a["fail"],
                              "all_us": round(a["cpu_us_per_req"], 1),
                              "daemon_us": round(a["daemon_us_per_req"], 1),
                              "frontend_us": round(a["cpu_us_per_req"]
                                                   - a["daemon_us_per_req"], 1)}),
                  flush=True)
    return 0


def p1_only(rounds: int, workers: int) -> int:
    """P1 alone (direct and llmux interleaved as in the full run), one line per round:
    quick A/B runs of the added latency (same PYTHONPATH method as ``--p2-only``)."""
    models = {"fast": fast_model()}
    with _bench_daemon(models, workers, "llmux-bench-p1-") as (_daemon, port):
        targets = [Target("direct", models["fast"]["port"], "fast"),
                   Target("llmux", port, "fast")]
        p1_latency(targets, 2, 50)  # start the model, warm connections
        for r in range(rounds):
            lat = p1_latency(targets, 2, 150)
            d, x = lat["direct"], lat["llmux"]
            print(json.dumps({"round": r, "loadavg": round(os.getloadavg()[0], 2),
                              "direct_p50_ms": round(percentile(d, 50) * 1e3, 3),
                              "added_p50_ms": round((percentile(x, 50) - percentile(d, 50))
                                                    * 1e3, 3),
                              "added_p99_ms": round((percentile(x, 99) - percentile(d, 99))
                                                    * 1e3, 3)}), flush=True)
    return 0


def p3b_only(rounds: int, workers: int, steady: bool = False) -> int:
    """P3b alone (direct, then llmux), one line per round: quick A/B runs of the
    streaming path under overload (same PYTHONPATH method as ``--p2-only``), with the
    CPU of all llmux processes per relayed chunk."""
    models = {"stream": stream_model()}
    with _bench_daemon(models, workers, "llmux-bench-p3b-") as (daemon, port):
        targets = [Target("direct", models["stream"]["port"], "stream"),
                   Target("llmux", port, "stream")]
        p1_latency(targets, 2, 20)  # start the model, warm connections
        streams, per_client, stagger = (256, 2, 2.0) if steady else (1024, 1, 0.0)
        for r in range(rounds):
            res = p3_streams(targets[:1], 1, streams, 200, per_client, stagger)
            before = cpu_seconds(llmux_pids(daemon))
            res.update(p3_streams(targets[1:], 1, streams, 200, per_client, stagger))
            cpu = cpu_seconds(llmux_pids(daemon)) - before
            d, x = res["direct"], res["llmux"]
            print(json.dumps({"round": r, "loadavg": round(os.getloadavg()[0], 2),
                              "ttfc_p50_ms": round(x["ttfc_p50"] * 1e3, 1),
                              "added_ttfc_p50_ms": round((x["ttfc_p50"] - d["ttfc_p50"]) * 1e3,
                                                         1),
                              "ttfc_p99_ms": round(x["ttfc_p99"] * 1e3, 1),
                              "chunk_rate_vs_direct": round(x["chunk_rate"] / d["chunk_rate"], 3)
                              if d["chunk_rate"] else None,
                              "fail": x["fail"],
                              # all llmux processes' CPU over the chunks relayed
                              "cpu_us_per_chunk": round(cpu / (x["n"] * 200) * 1e6, 2)
                              if x["n"] else None}), flush=True)
    return 0


def p3b_steady_only(rounds: int, workers: int) -> int:
    """1,024 streams open throughout, at 25 tokens/s each (25,600 chunks/s in all, as
    in P3), against direct, llmux and nginx (when installed) in rotating order, one
    JSON line per target and round: TTFC, chunk rate, and CPU per relayed chunk of the
    proxy (all llmux processes; nginx's workers) and of the simulated child. On a
    2-core box the sum of the proxy's, the child's and the load generator's CPU is
    what sets the child's own latency, so the child's share is printed too."""
    rate = P3B_STEADY_RATE
    models = {"stream": stream_model(rate)}
    child_port = models["stream"]["port"]
    with _bench_daemon(models, workers, "llmux-bench-p3bs-") as (daemon, port):
        targets = [Target("direct", child_port, "stream"), Target("llmux", port, "stream")]
        pids = {"direct": lambda: [], "llmux": lambda: llmux_pids(daemon)}
        nginx = None
        binary = find_nginx()
        if binary:
            n_port = free_port()
            nginx = Nginx(binary, Path(tempfile.mkdtemp(prefix="llmux-bench-nginx-")),
                          {n_port: child_port})
            nginx.start()
            targets.append(Target("nginx", n_port, "stream"))
            pids["nginx"] = nginx.pids
        try:
            p1_latency(targets, len(targets), 20)  # start the model, warm connections
            child = [p.pid for p in psutil.Process(daemon.pid).children()
                     if " serve " in " ".join(p.cmdline())]
            for r in range(rounds):
                for t in targets[r % len(targets):] + targets[:r % len(targets)]:
                    before, child_before = cpu_seconds(pids[t.name]()), cpu_seconds(child)
                    x = p3_streams([t], 1, 1024, 200, 2, 200 / rate)[t.name]
                    chunks = x["n"] * 200
                    print(json.dumps({
                        "round": r, "target": t.name, "loadavg": round(os.getloadavg()[0], 2),
                        "ttfc_p50_ms": round(x["ttfc_p50"] * 1e3, 1),
                        "ttfc_p99_ms": round(x["ttfc_p99"] * 1e3, 1),
                        "chunks_per_s": round(x["chunk_rate"]), "fail": x["fail"],
                        "proxy_cpu_us_per_chunk": round(
                            (cpu_seconds(pids[t.name]()) - before) / chunks * 1e6, 2)
                        if chunks else None,
                        "child_cpu_us_per_chunk": round(
                            (cpu_seconds(child) - child_before) / chunks * 1e6, 2)
                        if chunks else None}), flush=True)
        finally:
            if nginx is not None:
                nginx.stop()
    return 0


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def render(r: dict[str, Any]) -> str:
    load = r["config"].get("loadavg") or (0.0, 0.0, 0.0)
    lines = [f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{os.cpu_count()} CPUs (load average {load[0]:.1f} / {load[1]:.1f} / "
             f"{load[2]:.1f} at the start, from other work on the machine), "
             f"Python {platform.python_version()}, gunicorn + uvicorn worker (uvloop, "
             f"httptools), {r['config']['workers']} workers, "
             f"{r['seconds']:.0f} s in all.", ""]
    p1 = r["p1"]
    d50 = percentile(p1["direct"], 50)
    lines += ["### P1: added latency, non-streaming, concurrency 1", "",
              "| target | n | p50 ms | p99 ms | added p50 ms | added p99 ms |",
              "|---|---|---|---|---|---|"]
    added = {}
    for name, values in p1.items():
        p50, p99 = percentile(values, 50), percentile(values, 99)
        added[name] = p50 - d50
        lines.append(f"| {name} | {len(values)} | {ms(p50)} | {ms(p99)} | "
                     f"{ms(p50 - d50)} | {ms(p99 - percentile(p1['direct'], 99))} |")
    lines += ["", f"Target llmux added p50 ≤ 0.5 ms: {ms(added['llmux'])} ms — "
              f"{verdict(added['llmux'] <= 0.0005)}.", ""]

    p2 = r["p2"]
    lines += ["### P2: concurrency 64, non-streaming", "",
              "| target | requests | failed | req/s | vs direct | CPU µs/request (proxy) |",
              "|---|---|---|---|---|---|"]
    for name, a in p2.items():
        cpu = f"{a['cpu_us_per_req']:.0f}" if name != "direct" else "—"
        lines.append(f"| {name} | {int(a['ok'])} | {int(a['fail'])} | {a['rps']:.0f} | "
                     f"{a['rps'] / p2['direct']['rps']:.2f} | {cpu} |")
    llmux_cpu = p2["llmux"]["cpu_us_per_req"]
    frac_nginx = (f", {p2['llmux']['rps'] / p2['nginx']['rps']:.2f} of nginx"
                  if "nginx" in p2 else "")
    daemon_cpu = p2["llmux"]["daemon_us_per_req"]
    lines += ["", f"Target CPU of all llmux processes (daemon, gunicorn master and workers) "
              f"≤ 250 µs/request: {llmux_cpu:.0f} µs (llmuxd itself {daemon_cpu:.0f}, the "
              f"front end {llmux_cpu - daemon_cpu:.0f}) — {verdict(llmux_cpu <= 250)}. "
              f"llmux req/s = {p2['llmux']['rps'] / p2['direct']['rps']:.2f} of direct"
              f"{frac_nginx}.", ""]

    p3 = r["p3"]
    lines += ["### P3: 256 concurrent streams (200 chunks each, 10 ms apart)", "",
              "Steady state: 256 clients each run 2 streams back to back, first starts "
              "spread over one stream's duration, so 256 streams are open throughout.", ""]
    lines += _p3_table(p3)
    lx = p3["llmux"]
    add_ttfc = lx["ttfc_p50"] - p3["direct"]["ttfc_p50"]
    rate = lx["chunk_rate"] / p3["direct"]["chunk_rate"]
    lines += ["", f"Targets: added TTFC p50 ≤ 5 ms: {ms(add_ttfc)} ms — "
              f"{verdict(add_ttfc <= 0.005)}; chunk rate ≥ 95 % of direct: {rate:.1%} — "
              f"{verdict(rate >= 0.95)}; no stream fails: {lx['fail']} failed — "
              f"{verdict(lx['fail'] == 0)}.", ""]
    lines += ["Burst, for information: all 256 streams start at the same instant (each "
              "needs its lease, a thread and an upstream connection at once).", ""]
    lines += _p3_table(r["p3_burst"])
    lines.append("")
    p3b = r["p3b"]
    lb = p3b["llmux"]
    lines += [f"### P3b: {lb['n']} concurrent streams, all started at once", "",
              "None may wait for another to end: a thread-per-stream front end would "
              "hold the ones past its thread count for a whole stream.", ""]
    lines += _p3_table(p3b)
    lines += ["", "Targets: " + _p3b_verdicts(p3b, r["p3b_duration"]), ""]
    steady = r["p3b_steady"]
    sdur = r["p3b_steady_duration"]
    ls = steady["llmux"]
    clients = ls["n"] // 2
    lines += [f"Steady state, for comparison: {clients:,} clients each run 2 streams back to "
              f"back ({P3B_STEADY_RATE} tokens/s each, so {ls['n']:,} streams of {sdur:.0f} s, "
              f"first starts spread over one stream's duration): {clients:,} streams open "
              "throughout, relaying as many chunks per second as P3.", ""]
    lines += _p3_table(steady)
    lines += ["", "The same targets: " + _p3b_verdicts(steady, sdur), ""]
    a1 = r["a1"]
    lines += ["### A1: half-sent requests do not delay others", "",
              f"P1's request through llmux at concurrency 1, alternating rounds without "
              f"and with {a1['opened']} connections that sent half a request head and "
              "stalled (the worker drops them after `head_timeout_secs`).", "",
              "| load | n | p50 ms |", "|---|---|---|"]
    for k in ("unloaded", "stalled"):
        lines.append(f"| {k} | {a1['n'][k]} | {ms(a1['p50'][k])} |")
    lines += ["", f"Target p50 with stalled connections within 2x of unloaded: "
              f"{a1['ratio']:.2f}x — {verdict(a1['ratio'] <= 2.0)}.", ""]
    lines += ["Lone stream (50 chunks, 10 ms apart): reads = socket reads that carried data; "
              "reads ≈ chunks means nothing was held back and batched.", "",
              "| target | chunks | reads | gap p50 ms | gap max ms |", "|---|---|---|---|---|"]
    for name, a in r["lone"].items():
        lines.append(f"| {name} | {a['events']} | {a['reads']} | {ms(a['gap_p50'])} | "
                     f"{ms(a['gap_max'])} |")
    lines.append("")

    lines += _p4_lines(r["p4"])
    return "\n".join(lines)


def _p3b_verdicts(p3b: dict[str, dict[str, float]], duration: float) -> str:
    """P3b's targets on one of its loads (burst or steady state), one line."""
    lx, direct = p3b["llmux"], p3b["direct"]
    added = lx["ttfc_p50"] - direct["ttfc_p50"]
    rate = lx["chunk_rate"] / direct["chunk_rate"]
    return (f"TTFC p99 below one stream's duration ({duration * 1000:.0f} ms): "
            f"{ms(lx['ttfc_p99'])} ms — {verdict(lx['ttfc_p99'] < duration)}; added TTFC "
            f"p50 ≤ 5 ms: {ms(added)} ms — {verdict(added <= 0.005)}; chunk rate ≥ 95 % of "
            f"direct: {rate:.1%} — {verdict(rate >= 0.95)}; no stream fails: "
            f"{lx['fail']} failed — {verdict(lx['fail'] == 0)}.")


def _p4_lines(p4: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    lines += ["### P4: switch overhead (L1 sleep of one simulated model, L1 wake of the other)",
              "", "Both models are started (and switched once) before measuring, so every "
              "row is a warm switch: drain, L1 sleep, verify, L1 wake, warm-up. Each "
              "request is sent once the active model's policy quantum (fifo: as long as "
              "the switch into it took) is over: \"idled\" is the time P4 waited for that "
              "before sending, policy time that is not counted as overhead.",
              "", "| # | ok | idled ms | request wall ms | child sleep ms | child wake ms "
              "| overhead ms | daemon's switch total ms | daemon's phases ms |",
              "|---|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(p4, 1):
        phases = ", ".join(f"{k} {v:.0f}" for k, v in row.get("phases", {}).items())
        lines.append(f"| {i} | {'yes' if row['ok'] else 'no'} | "
                     f"{ms(row.get('quantum_wait', 0.0))} | {ms(row['total'])} | "
                     f"{ms(row['sleep'])} | {ms(row['wake'])} | {ms(row['overhead'])} | "
                     f"{row['daemon_total_ms']:.1f} | {phases} |")
    good = [row["overhead"] for row in p4 if row["ok"]]
    med = statistics.median(good) if good else float("nan")
    lines += ["", f"Target switch overhead p50 ≤ 50 ms: {ms(med)} ms over {len(good)} "
              f"switches — {verdict(bool(good) and med <= 0.050)}.", ""]
    return lines


def _p3_table(p3: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| target | streams | failed | TTFC p50 ms | TTFC p99 ms | added TTFC p50 ms "
             "| chunks/s | vs direct |", "|---|---|---|---|---|---|---|---|"]
    for name, a in p3.items():
        lines.append(f"| {name} | {a['n']} | {a['fail']} | {ms(a['ttfc_p50'])} | "
                     f"{ms(a['ttfc_p99'])} | {ms(a['ttfc_p50'] - p3['direct']['ttfc_p50'])} | "
                     f"{a['chunk_rate']:.0f} | "
                     f"{a['chunk_rate'] / p3['direct']['chunk_rate']:.2f} |")
    return lines


def write_doc(results: str) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{results}\n{END}{tail}")


if __name__ == "__main__":
    raise SystemExit(main())
