"""P5: the policy simulator's workloads end to end, every policy, beside its prediction.

    .venv/bin/python bench/policies.py               # full run (~10 min), writes the doc
    .venv/bin/python bench/policies.py --quick       # 3 profiles, L1 only, no doc

The 12 workloads of the Rust llmux 0.9 simulator (``llmuxd.policy.workloads``, E's
generators) are replayed as real HTTP requests (``POST /v1/chat/completions``,
each a 0.5 s generation) at their arrival times, through a real llmuxd and its
gunicorn front end, to simulated 14B children (``llmux-sim-vllm``, 28 GiB of
weights, the timing model's L1 and L2 costs; models at 0.9 of one GPU, so one at a
time). Every policy runs against its own daemon, the four in parallel, one sleep
level after the other. Before each workload every model is put to sleep, as the
simulator starts them.

Time is scaled by ``SCALE`` everywhere at once (the children's durations through
``LLMUX_SIM_TIME_SCALE``, the arrival times and request lengths, the policy's
seconds, the request and drain timeouts), so the run fits in minutes; figures are
reported unscaled. The prediction beside each figure is the discrete-event
simulator (``llmuxd.policy.simulate``) on the same workload with vLLM's batching
(``max_num_seqs`` 256, as the simulated child serves), the same costs, the same
policy options and timeouts, and the switch costs the daemon had learned when the
workload began. Measured end to end:

* done / failed: 200 with every token / anything else (504 at the gate, cut);
* switches: the daemon's ``switch`` records that brought a model in;
* serving %: time some request was generating ÷ (that + the switches' GPU time,
  i.e. their total minus the drain), the simulator's definition;
* max wait: arrival → first token (the request's end minus its generation time).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmux_testkit.daemon import DaemonProcess, free_port, post_json, sim_model  # noqa: E402
from llmuxd.config import load_config  # noqa: E402
from llmuxd.policy import POLICY_TYPES  # noqa: E402
from llmuxd.policy.options import PolicyOptions  # noqa: E402
from llmuxd.policy.simulate import SimConfig, Simulation  # noqa: E402
from llmuxd.policy.workloads import COSTS, SERVICE, Workload, rust_profiles  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- BEGIN P5 (bench/policies.py) -->", "<!-- END P5 -->"

SCALE = 0.5                 # every duration of the run x this
TOKEN_RATE = 50.0           # tokens/s per request in the child (unscaled)
TOKENS = round(SERVICE * TOKEN_RATE)   # a 0.5 s generation
REQUEST_TIMEOUT = 60.0      # the daemon's defaults (unscaled)
DRAIN_TIMEOUT = 30.0
LEVEL_COSTS = {1: "14B-L1", 2: "14B-L2"}


def scaled_policy(policy: str) -> dict[str, Any]:
    """The [policy] table: the policy, its default options and the timeouts, x SCALE."""
    o = PolicyOptions()
    table: dict[str, Any] = {"policy_type": policy, "request_timeout_secs":
                             REQUEST_TIMEOUT * SCALE, "min_active_secs": 0.0}
    for f in dataclasses.fields(o):
        v = getattr(o, f.name)
        table[f.name] = v if f.name in ("amortization_factor", "linger_factor") else v * SCALE
    return table


def child_args() -> list[str]:
    return ["--sim-size-gib", "28", "--sim-token-rate", str(TOKEN_RATE), "--sim-ttft-s", "0"]


def post(port: int, path: str, body: dict[str, Any], timeout: float) -> tuple[int, Any]:
    return post_json("127.0.0.1", port, path, body, timeout)


def replay(port: int, w: Workload) -> list[dict[str, Any]]:
    """Send every request of ``w`` at its (scaled) arrival time; their outcomes."""
    out: list[dict[str, Any]] = []
    lock = threading.Lock()
    start = time.monotonic() + 0.2
    gen_s = SERVICE * SCALE

    def one(model: str, arrival: float) -> None:
        at = start + arrival * SCALE
        time.sleep(max(0.0, at - time.monotonic()))
        sent = time.monotonic()
        try:
            status, body = post(port, "/v1/chat/completions", {
                "model": model, "max_tokens": TOKENS, "ignore_eos": True,
                "messages": [{"role": "user", "content": "hello"}]},
                timeout=REQUEST_TIMEOUT * SCALE * 3 + 60)
        except OSError as exc:
            status, body = 0, str(exc)
        done = time.monotonic()
        ok = status == 200 and isinstance(body, dict) and \
            body.get("usage", {}).get("completion_tokens") == TOKENS
        with lock:
            out.append({"model": model, "arrival": at, "sent": sent, "done": done, "ok": ok,
                        "status": status, "first_token": done - gen_s if ok else None})
    threads = [threading.Thread(target=one, args=(r.model, r.arrival), daemon=True)
               for r in w.requests]
    for t in threads:
        t.start()
    limit = time.monotonic() + 600
    for t in threads:
        t.join(max(0.1, limit - time.monotonic()))
    return out


def all_asleep(d: DaemonProcess, models: list[str], timeout: float = 120) -> None:
    """Every model asleep (or stopped): the state the simulator starts from."""
    deadline = time.monotonic() + timeout
    for m in models:
        while True:
            code, body = d.request("POST", f"/v1/models/{m}/sleep", {}, timeout=timeout)
            if code == 200:
                break
            if code != 409 or time.monotonic() > deadline:   # 409: busy, try again
                raise RuntimeError(f"sleep {m}: {code} {body}")
            time.sleep(0.2)
    d.wait_for(lambda: all(d.status(m)["state"] in ("sleeping", "stopped") for m in models),
               timeout, "every model asleep")


def _ts(rec: dict[str, Any]) -> float:
    return datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()


def measure(w: Workload, reqs: list[dict[str, Any]], switches: list[dict[str, Any]]
            ) -> dict[str, Any]:
    """The simulator's figures from one end-to-end replay (unscaled seconds)."""
    done = [r for r in reqs if r["ok"]]
    spans = sorted((r["first_token"], r["done"]) for r in done)
    serving = 0.0
    cur_s, cur_e = None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None and cur_s is not None:
                serving += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None and cur_s is not None:
        serving += cur_e - cur_s
    switching = sum(max(0.0, (s["total_ms"] or 0.0) - s.get("drain_ms", 0.0)) / 1000
                    for s in switches)
    waits = [r["first_token"] - r["arrival"] for r in done]
    waits += [REQUEST_TIMEOUT * SCALE for r in reqs if not r["ok"]]
    total = serving + switching
    return {"done": len(done), "failed": len(reqs) - len(done), "switches": len(switches),
            "serving_pct": 100.0 * serving / total if total > 0 else 100.0,
            "max_wait": max(waits, default=0.0) / SCALE}


def predict(w: Workload, level: int, policy: str,
            learned: dict[tuple[str | None, str], float]) -> dict[str, Any]:
    cfg = SimConfig(policy=policy, options=PolicyOptions(), drain_before_switch=True,
                    min_active_secs=0.0, drain_timeout_secs=DRAIN_TIMEOUT,
                    request_timeout_secs=REQUEST_TIMEOUT)
    sim = Simulation(dataclasses.replace(w, max_num_seqs=256), COSTS[LEVEL_COSTS[level]], cfg)
    sim.costs = dict(learned)
    r = sim.run()
    return {"done": r.completed, "failed": r.failed, "switches": r.switches,
            "serving_pct": r.serving_pct, "max_wait": r.max_wait}


def unique_ports(n: int) -> list[int]:
    """``n`` distinct free ports, chosen in one process (the parallel runs must not
    pick the same one: a child would then answer for another daemon's model)."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def run_one(level: int, policy: str, names: list[str], out: Path, ports: list[int]) -> None:
    """One daemon, one policy, one level: every workload in turn; JSON to ``out``."""
    models = {m: sim_model(port, model_path="sim/Qwen3-14B", sleep_level=level,
                           gpu_memory_utilization=0.9, extra_args=child_args())
              for m, port in zip(("A", "B", "C"), ports[:3], strict=True)}
    config = {"port": ports[3], "proxy": {"host": "127.0.0.1", "workers": 2, "threads": 128},
              "policy": scaled_policy(policy),
              "daemon": {"drain_timeout_secs": DRAIN_TIMEOUT * SCALE,
                         "startup_timeout_secs": 300, "wake_timeout_secs": 300,
                         "sleep_timeout_secs": 120, "max_queue_per_model": 4096}}
    results: dict[str, Any] = {"level": level, "policy": policy, "workloads": {}}
    with DaemonProcess(models, config=config, frontend=True, log_level="info",
                       env={"LLMUX_SIM_TIME_SCALE": str(SCALE)}, start_timeout=120) as d:
        port = load_config(d.config_path).port
        for m in models:                       # prewarm: the first switch is a wake
            code, body = d.request("POST", f"/v1/models/{m}/start", {}, timeout=300)
            if code != 200:
                raise RuntimeError(f"start {m}: {code} {body}")
            all_asleep(d, [m])
        for w in rust_profiles():
            if w.name not in names:
                continue
            all_asleep(d, list(models))
            learned = {(c["from"], c["to"]): c["secs"] / SCALE
                       for c in d.status()["scheduler"]["switch_costs"]}
            t0 = time.time()
            reqs = replay(port, w)
            t1 = time.time()
            switches = [dict(s, drain_ms=s.get("drain_ms") or 0.0)
                        for s in d.log_events("switch")
                        if s.get("to_model") and s.get("result") == "ok"
                        and t0 <= _ts(s) <= t1]
            results["workloads"][w.name] = {
                "e2e": measure(w, reqs, switches),
                "sim": predict(w, level, policy, learned),
            }
            print(f"L{level} {policy} {w.name}: {results['workloads'][w.name]}",
                  file=sys.stderr, flush=True)
        assert d.stop(timeout=120) == 0
    out.write_text(json.dumps(results))


def render(runs: list[dict[str, Any]], names: list[str], seconds: float,
           loadavg: tuple[float, float, float]) -> str:
    lines = [f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{os.cpu_count()} CPUs (load average {loadavg[0]:.1f} at the start), "
             f"time scale {SCALE}, {seconds:.0f} s in all. Each cell: end to end / "
             "simulator. Times unscaled.", ""]
    for level in (1, 2):
        rows = [r for r in runs if r["level"] == level]
        if not rows:
            continue
        c = COSTS[LEVEL_COSTS[level]]
        lines += [f"### P5, 14B at L{level} (sleep {c.sleep_s:.2f} s, wake {c.wake_s:.2f} s)",
                  "", "| workload | policy | done | failed | switches | serving % | "
                  "max wait s |", "|---|---|---|---|---|---|---|"]
        for name in names:
            for r in sorted(rows, key=lambda r: POLICY_TYPES.index(r["policy"])):
                cell = r["workloads"].get(name)
                if cell is None:
                    continue
                e, s = cell["e2e"], cell["sim"]
                lines.append(
                    f"| {name} | {r['policy']} | {e['done']} / {s['done']} "
                    f"| {e['failed']} / {s['failed']} | {e['switches']} / {s['switches']} "
                    f"| {e['serving_pct']:.1f} / {s['serving_pct']:.1f} "
                    f"| {e['max_wait']:.1f} / {s['max_wait']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + block + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n## P5: the policies end to end\n\n" + block + "\n"
    DOC.write_text(doc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 workloads at L1 (smoke test)")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--levels", default="1,2")
    ap.add_argument("--one", nargs=4, metavar=("LEVEL", "POLICY", "OUT", "PORTS"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--workloads", default="")
    args = ap.parse_args()
    names = [w.name for w in rust_profiles()]
    if args.workloads:
        names = [n for n in args.workloads.split(",") if n]
    if args.quick:
        names = ["balanced", "surge", "three_model"]
        args.levels = "1"
    if args.one:
        run_one(int(args.one[0]), args.one[1], names, Path(args.one[2]),
                [int(p) for p in args.one[3].split(",")])
        return 0
    started = time.monotonic()
    loadavg = os.getloadavg()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"llmux-p5-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for level in [int(x) for x in args.levels.split(",")]:
        jobs = {}
        with concurrent.futures.ThreadPoolExecutor(len(POLICY_TYPES)) as pool:
            ports = unique_ports(4 * len(POLICY_TYPES))
            for i, policy in enumerate(POLICY_TYPES):
                out = tmp / f"L{level}-{policy}.json"
                mine = ",".join(str(p) for p in ports[4 * i:4 * i + 4])
                cmd = [sys.executable, __file__, "--one", str(level), policy, str(out), mine,
                       "--workloads", ",".join(names)]
                jobs[policy] = (out, pool.submit(subprocess.run, cmd, timeout=900))
            for policy, (out, fut) in jobs.items():
                proc = fut.result()
                if proc.returncode != 0 or not out.exists():
                    raise SystemExit(f"L{level} {policy} failed ({proc.returncode})")
                runs.append(json.loads(out.read_text()))
    text = render(runs, names, time.monotonic() - started, loadavg)
    print(text)
    (tmp / "report.json").write_text(json.dumps(runs, indent=1))
    if not args.no_doc and not args.quick:
        write_doc(text)
        print(f"wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
