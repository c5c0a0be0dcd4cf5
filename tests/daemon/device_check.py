"""GPU-machine check (not a test): llmuxd's memory preflight against real NVML readings.

Run on a machine with an NVIDIA GPU: ``python3 -m tests.daemon.device_check OUTDIR``.
Simulated vLLM children (they hold no real GPU memory), ``gpu_probe = "nvml"``; a torch
process plays a foreign tenant that fills the GPU. Expect: the model starts while the
GPU is free, its start is refused with "not enough free GPU memory" while the hog holds
the memory, and it starts again once the hog is gone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmux_testkit.daemon import DaemonProcess, sim_model

HOG = ("import sys, time, torch\n"
       "free, total = torch.cuda.mem_get_info()\n"
       "x = torch.empty(int(free * 0.9), dtype=torch.uint8, device='cuda')\n"
       "print('holding', x.numel() >> 20, 'MiB of', total >> 20, flush=True)\n"
       "time.sleep(600)\n")


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    tmp = Path(tempfile.mkdtemp(prefix="llmuxd-dev-"))
    wrapper = tmp / "sim-vllm"
    wrapper.write_text("#!/bin/sh\nexec " + sys.executable
                       + " -c 'import sys; from vllmsim.cli import main; "
                       "sys.exit(main())' \"$@\"\n")
    wrapper.chmod(0o755)
    (tmp / "gpus").mkdir()
    (tmp / "gpus" / "gpus.json").write_text(json.dumps(
        {"gpus": [{"index": 0, "total_mib": 81920, "name": "sim"}]}))
    report: dict = {}
    d = DaemonProcess({"a": sim_model(gpu_memory_utilization=0.5)}, tmp=tmp,
                      env={"LLMUX_SIM_TIME_SCALE": "0.01"},
                      config={"vllm_command": str(wrapper),
                              "daemon": {"gpu_probe": "nvml", "restart_backoff_secs": 0.5}})
    hog = None
    try:
        d.start()
        report["gpus"] = d.status()["gpus"]
        d.wait_for(lambda: d.status()["gpus"], what="NVML readings")
        report["gpus"] = d.status()["gpus"]
        report["free_start"] = d.request("POST", "/v1/leases", {"model": "a"})
        report["kill"] = d.request("POST", "/v1/models/a/kill")[0]
        hog = subprocess.Popen([sys.executable, "-c", HOG], stdout=subprocess.PIPE, text=True)
        assert hog.stdout is not None
        report["hog"] = hog.stdout.readline().strip()
        report["gpus_with_hog"] = d.wait_for(
            lambda: (lambda g: g if g and g[0]["used_mib"] > 0.8 * g[0]["total_mib"] else None)(
                d.status()["gpus"]), what="the hog in the readings")
        report["hog_start"] = d.request("POST", "/v1/leases", {"model": "a"})
        hog.kill()
        hog.wait(30)
        time.sleep(1)
        report["after_hog_start"] = d.request("POST", "/v1/leases", {"model": "a"})
        report["status"] = d.status("a")
        report["exit"] = d.stop()
    finally:
        if hog is not None and hog.poll() is None:
            hog.kill()
        d.kill()
        (out / "device_check.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "llmuxd.log").write_text(d.output()[-200000:])
    print(json.dumps({k: report.get(k) for k in ("hog", "free_start", "hog_start",
                                                  "after_hog_start", "exit")}, indent=1,
                     default=str)[:6000])
    ok = (report.get("free_start", [0])[0] == 200 and report.get("hog_start", [0])[0] == 503
          and report.get("after_hog_start", [0])[0] == 200)
    print("DEVICE CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
