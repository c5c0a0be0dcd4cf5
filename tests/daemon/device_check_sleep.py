"""GPU-machine check (not a test): llmuxd's sleep verification against real NVML readings.

Run on a machine with an NVIDIA GPU: ``python3 -m tests.daemon.device_check_sleep OUTDIR``.
Simulated vLLM children in real-CUDA mode (``LLMUX_SIM_REAL_CUDA=1``: each engine child
really holds its GPU share with torch and frees it on an L1/L2 sleep), ``gpu_probe =
"nvml"``. Models a and b take 0.45 of the GPU each (a sleeps at L1, b at L2), c takes 0.8.
Checks, each recorded in OUTDIR/device_check_sleep.json:

1. a and b are active together, and NVML shows each one's share under its pids;
2. a lease on c makes a and b sleep (L1, L2); NVML shows them down to the CUDA-context
   residue, the daemon's verify passed (no sleep_failed), then c starts;
3. with the ``sleep_no_free`` fault set at run time on c, a lease on a switches c out:
   the daemon finds the sleep ineffective through NVML and escalates to L3 (c stopped, its
   memory gone), and a's lease is still granted;
4. after SIGTERM to llmuxd, no process of ours holds GPU memory.

``--rehearse`` runs the same script on a CPU: ``gpu_probe = "sim"``, the simulated
GPU state read instead of NVML, and a stand-in torch (tests/sim/faketorch) so the
real-CUDA code path of the engine runs too.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from llmux_testkit.daemon import DaemonProcess, sim_model
from vllmsim.gpustate import GpuState

RESIDUE_MIB = 2048  # the daemon's sleep_residue_mib in this check


class Reader:
    """pid -> MiB on GPU 0, from NVML (device) or the simulated state (rehearsal)."""

    def __init__(self, rehearse: bool, gpu_dir: Path) -> None:
        self.rehearse = rehearse
        self.state = GpuState(gpu_dir)
        if not rehearse:
            import pynvml

            pynvml.nvmlInit()
            self.nvml: Any = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)

    def total_mib(self) -> int:
        if self.rehearse:
            return self.state.snapshot()[0].total_mib
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).total) >> 20

    def by_pid(self) -> dict[int, int]:
        if self.rehearse:
            return {pid: sum(u.values()) for pid, u in self.state.usage_by_pid().items()}
        procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        return {int(p.pid): int(p.usedGpuMemory or 0) >> 20 for p in procs}


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--rehearse"]
    rehearse = "--rehearse" in sys.argv[1:]
    out = Path(args[0] if args else ".")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="llmuxd-devsleep-"))
    wrapper = tmp / "sim-vllm"
    wrapper.write_text("#!/bin/sh\nexec " + sys.executable
                       + " -c 'import sys; from vllmsim.cli import main; "
                       "sys.exit(main())' \"$@\"\n")
    wrapper.chmod(0o755)
    GpuState(tmp / "gpus").init(1, 81920)
    env = {"LLMUX_SIM_TIME_SCALE": "0.01", "LLMUX_SIM_FAULT_API": "1",
           "LLMUX_SIM_REAL_CUDA": "1"}
    if rehearse:
        fake = Path(__file__).resolve().parents[1] / "sim" / "faketorch"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(fake), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["FAKE_TORCH_LOG"] = str(tmp / "faketorch.log")
    models = {"a": sim_model(gpu_memory_utilization=0.45, sleep_level=1),
              "b": sim_model(gpu_memory_utilization=0.45, sleep_level=2),
              "c": sim_model(gpu_memory_utilization=0.8, sleep_level=1)}
    d = DaemonProcess(models, tmp=tmp, env=env,
                      config={"vllm_command": str(wrapper),
                              "daemon": {"gpu_probe": "sim" if rehearse else "nvml",
                                         "sleep_residue_mib": RESIDUE_MIB,
                                         "restart_backoff_secs": 0.5}})
    reader = Reader(rehearse, tmp / "gpus")
    report: dict[str, Any] = {"probe": "sim (rehearsal)" if rehearse else "nvml",
                              "total_mib": reader.total_mib(), "checks": {}}
    checks: dict[str, Any] = report["checks"]
    pids: dict[str, set[int]] = {"a": set(), "b": set(), "c": set()}
    t_start = time.monotonic()

    def learn(name: str) -> None:
        """Remember the model's pids (server and engine child) while they live."""
        pid = d.status(name).get("pid")
        if pid:
            pids[name].add(int(pid))
            for p in d.descendants():
                try:
                    if os.getpgid(p.pid) == int(pid):
                        pids[name].add(p.pid)
                except OSError:
                    continue

    def mib(name: str) -> int:
        usage = reader.by_pid()
        return sum(usage.get(p, 0) for p in pids[name])

    def poll(cond: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
        return d.wait_for(cond, timeout, what)

    def events(name: str, model: str) -> list[dict[str, Any]]:
        return [e for e in d.log_events(name) if e.get("model") == model]

    total = report["total_mib"]
    try:
        d.start()
        # 1. two 0.45 models active together
        c1: dict[str, Any] = {}
        for name in ("a", "b"):
            st, body = d.request("POST", f"/v1/models/{name}/start")
            c1[f"start_{name}"] = [st, body.get("state")]
            learn(name)
        c1["mib"] = poll(lambda: (lambda m: m if min(m.values()) > 0.4 * total else None)(
            {n: mib(n) for n in ("a", "b")}), "a and b to hold their share")
        c1["states"] = {n: d.status(n)["state"] for n in ("a", "b")}
        c1["daemon_gpu_memory_mib"] = {n: d.status(n)["gpu_memory_mib"] for n in ("a", "b")}
        c1["ok"] = c1["states"] == {"a": "active", "b": "active"}
        checks["1_two_active"] = c1

        # 2. a lease on c makes both sleep (L1, L2), verified, then c starts
        c2: dict[str, Any] = {}
        st, lease = d.request("POST", "/v1/leases", {"model": "c"})
        c2["lease"] = [st, {k: lease.get(k) for k in ("switched", "waited_ms", "error")}]
        learn("c")
        c2["states"] = {n: [d.status(n)["state"], d.status(n)["sleep_level"]]
                        for n in ("a", "b", "c")}
        c2["mib_after_sleep"] = {n: mib(n) for n in ("a", "b")}
        c2["mib_c"] = poll(lambda: (lambda v: v if v > 0.75 * total else None)(mib("c")),
                           "c to hold its share")
        c2["last_switch"] = {n: d.status(n)["last_switch"] for n in ("a", "b")}
        c2["sleep_failed_events"] = events("sleep_failed", "a") + events("sleep_failed", "b")
        c2["ok"] = (st == 200
                    and c2["states"] == {"a": ["sleeping", 1], "b": ["sleeping", 2],
                                         "c": ["active", None]}
                    and all(v <= RESIDUE_MIB for v in c2["mib_after_sleep"].values())
                    and all((sw or {}).get("phases_ms", {}).get("verify") is not None
                            for sw in c2["last_switch"].values())
                    and not c2["sleep_failed_events"])
        if st == 200:
            d.request("POST", f"/v1/leases/{lease['lease_id']}/release",
                      {"status": 200, "bytes": 0, "ttfb_ms": 0, "duration_ms": 0,
                       "error": None})
        checks["2_sleep_verified"] = c2

        # 3. sleep_no_free on c: ineffective sleep caught by the probe, escalated to L3
        c3: dict[str, Any] = {}
        port = models["c"]["port"]
        c3["fault"] = requests.post(f"http://127.0.0.1:{port}/_sim/faults",
                                    json={"set": {"sleep_no_free": True}}, timeout=30).json()
        t0 = time.monotonic()
        st, lease = d.request("POST", "/v1/leases", {"model": "a"})
        c3["lease_a"] = [st, {k: lease.get(k) for k in ("switched", "waited_ms", "error")},
                         round(time.monotonic() - t0, 2)]
        c3["states"] = {n: d.status(n)["state"] for n in ("a", "c")}
        c3["sleep_failed_events"] = [{k: e.get(k) for k in ("level", "error")}
                                     for e in events("sleep_failed", "c")]
        c3["c_last_error"] = d.status("c")["last_error"]
        c3["mib_c_after"] = mib("c")
        c3["mib_a"] = poll(lambda: (lambda v: v if v > 0.4 * total else None)(mib("a")),
                           "a to hold its share again")
        c3["ok"] = (st == 200 and c3["states"] == {"a": "active", "c": "stopped"}
                    and any("ineffective" in str(e["error"]) for e in c3["sleep_failed_events"])
                    and c3["mib_c_after"] == 0)
        if st == 200:
            d.request("POST", f"/v1/leases/{lease['lease_id']}/release",
                      {"status": 200, "bytes": 0, "ttfb_ms": 0, "duration_ms": 0,
                       "error": None})
        checks["3_no_free_escalated"] = c3
        report["switch_events"] = [{k: e.get(k) for k in ("from_model", "to_model", "result",
                                                          "total_ms", "verify_ms")}
                                   for e in d.log_events("switch")]

        # 4. SIGTERM: nothing of ours left on the GPU
        c4: dict[str, Any] = {"exit": d.stop()}
        ours = set().union(*pids.values()) | d.seen_pids
        deadline = time.monotonic() + 30
        while True:  # the driver may list an exited process for a moment
            left = {p: v for p, v in reader.by_pid().items() if p in ours}
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        c4["left_on_gpu"] = left
        c4["gpu_processes_after"] = reader.by_pid()
        c4["ok"] = c4["exit"] == 0 and not c4["left_on_gpu"]
        checks["4_sigterm_clean"] = c4
    except BaseException as exc:
        report["error"] = repr(exc)[:4000]
    finally:
        d.kill()
        report["seconds"] = round(time.monotonic() - t_start, 1)
        if rehearse and (tmp / "faketorch.log").exists():  # the real-CUDA path ran
            ops = [ln.split()[1] for ln in (tmp / "faketorch.log").read_text().splitlines()]
            report["faketorch_ops"] = {op: ops.count(op) for op in sorted(set(ops))}
        report["passed"] = (len(checks) == 4 and all(c.get("ok") for c in checks.values())
                            and "error" not in report)
        (out / "device_check_sleep.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "llmuxd.log").write_text(d.output()[-2000000:])
        logs = sorted((tmp / "logs").glob("*")) if (tmp / "logs").exists() else []
        (out / "children.log").write_text("".join(
            f"==> {p.name}\n{p.read_text(errors='replace')[-20000:]}" for p in logs))
    print(json.dumps(report, indent=1, default=str)[:8000])
    print("DEVICE CHECK SLEEP", "PASSED" if report["passed"] else "FAILED")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
