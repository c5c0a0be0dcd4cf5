"""F1: the latency the HAProxy hop adds in front of llmux (P1 style), into docs/benchmarks.md.

    .venv/bin/python bench/fleet.py            # full run (about a minute)
    .venv/bin/python bench/fleet.py --quick    # smaller counts, for a smoke test

One real llmuxd (gunicorn front end, one simulated model that answers at once) and a
real Debian HAProxy with the config ``llmuxctl fleet haproxy`` writes for it. Three
targets — the child directly, llmux, HAProxy → llmux — take turns round by round with
the same load generator as P1 (bench/loadgen.py), concurrency 1, non-streaming; the
hop's cost is HAProxy's p50/p99 minus llmux's, measured in the same run. The model
is awake, so HAProxy routes on its readiness check (the primary), as in production.
Loopback only; every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # llmux_testkit
from loadgen import percentile, run_load
from run import Target, ms, p1_latency, wait_http

from llmux_testkit.daemon import DaemonProcess, free_port, sim_model
from llmux_testkit.procs import stop_group
from llmuxctl.fleet import Box, Options, render
from llmuxd.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- BEGIN FLEET RESULTS (bench/fleet.py) -->", "<!-- END FLEET RESULTS -->"


class HAProxy:
    """Debian's haproxy in the foreground, its own session; stopped and reaped on exit."""

    def __init__(self, config: str, tmp: Path) -> None:
        self.path = tmp / "haproxy.cfg"
        self.path.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> HAProxy:
        exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.proc = subprocess.Popen([exe, "-db", "-f", str(self.path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.proc is not None
        stop_group(self.proc)


def wait_routed(port: int, model: str, timeout: float) -> None:
    """Until a request through HAProxy succeeds (its checks have seen the model awake)."""
    deadline = time.monotonic() + timeout
    body = {"model": model, "prompt": "x", "max_tokens": 1}
    while True:
        results, _ = run_load(port, "/v1/completions", body, 1, 1, 10.0, 10.0)
        if results and results[0].ok:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"HAProxy on :{port} did not route {model}")
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    ap.add_argument("--no-doc", action="store_true", help="print only, do not write the doc")
    args = ap.parse_args()
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        raise SystemExit("haproxy not found (apt-get install haproxy)")
    started = time.monotonic()
    load = os.getloadavg()
    models = {"fast": sim_model(model_path="sim/fast-1b", gpu_memory_utilization=0.15,
                                sleep_level=1, extra_args=["--sim-time-scale", "0"])}
    config = {"proxy": {"host": "127.0.0.1", "workers": 2, "threads": 64},
              "daemon": {"warmup": False}}
    tmp = Path(tempfile.mkdtemp(prefix="llmux-bench-fleet-"))
    (tmp / "llmux").mkdir()
    with DaemonProcess(models, config=config, frontend=True, tmp=tmp / "llmux",
                       log_level="warning") as daemon:
        port = load_config(daemon.config_path).port
        wait_http(port, "/health", 60)
        hp = free_port()
        text = render([Box("box1", f"127.0.0.1:{port}", {"fast": []})],
                      Options(bind=f"127.0.0.1:{hp}", check_inter="500ms"))
        text = text.replace("    log /dev/log local0\n", "")
        with HAProxy(text, tmp):
            wait_routed(port, "fast", 120)   # starts the model through llmux
            wait_routed(hp, "fast", 60)
            targets = [Target("direct", int(models["fast"]["port"]), "fast"),
                       Target("llmux", port, "fast"), Target("haproxy+llmux", hp, "fast")]
            p1_latency(targets, len(targets), 50)   # warm every path
            lat = p1_latency(targets, 3 if args.quick else 6, 100 if args.quick else 300)
    shutil.rmtree(tmp, ignore_errors=True)
    lines = [f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{os.cpu_count()} CPUs (load average {load[0]:.1f} / {load[1]:.1f} / "
             f"{load[2]:.1f} at the start), Python {platform.python_version()}, "
             f"{_haproxy_version()}, {time.monotonic() - started:.0f} s in all.", "",
             "### F1: the HAProxy hop, non-streaming, concurrency 1", "",
             "| target | n | p50 ms | p99 ms | added p50 ms vs llmux | added p99 ms vs llmux |",
             "|---|---|---|---|---|---|"]
    base50, base99 = percentile(lat["llmux"], 50), percentile(lat["llmux"], 99)
    for name, values in lat.items():
        p50, p99 = percentile(values, 50), percentile(values, 99)
        lines.append(f"| {name} | {len(values)} | {ms(p50)} | {ms(p99)} | "
                     f"{ms(p50 - base50)} | {ms(p99 - base99)} |")
    hop = percentile(lat["haproxy+llmux"], 50) - base50
    lines += ["", f"The HAProxy hop adds {ms(hop)} ms at p50 "
              f"({percentile(lat['haproxy+llmux'], 50) / base50:.2f} times llmux alone)."]
    result = "\n".join(lines)
    print(result)
    if not args.no_doc:
        write_doc(result)
    return 0


def _haproxy_version() -> str:
    try:
        out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, timeout=10)
        return out.stdout.split(" - ")[0].replace("HAProxy version", "HAProxy").strip()
    except OSError:
        return "HAProxy ?"


def write_doc(results: str) -> None:
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        text += ("\n## Fleet: the HAProxy hop (bench/fleet.py)\n\n"
                 "What routing through HAProxy (docs/fleet.md) adds to a request, measured "
                 "like P1 against llmux alone in the same run.\n\n"
                 f"{BEGIN}\n{END}\n")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{results}\n{END}{tail}")


if __name__ == "__main__":
    raise SystemExit(main())
