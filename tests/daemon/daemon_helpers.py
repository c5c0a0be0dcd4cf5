"""Helpers for the daemon's end-to-end tests (lease, ask upstream, read sim GPUs)."""

from __future__ import annotations

from typing import Any

from llmux_testkit.daemon import DaemonProcess, post_json
from llmuxd.child import pids_in_group
from llmuxd.gpu.memory import child_usage
from llmuxd.gpu.sim import SimGpuProbe


def lease(d: DaemonProcess, model: str, timeout: float = 120.0) -> tuple[int, Any]:
    return d.request("POST", "/v1/leases", {"model": model}, timeout=timeout)


def release(d: DaemonProcess, lease_id: str, status: int = 200) -> None:
    code, body = d.request("POST", f"/v1/leases/{lease_id}/release",
                           {"status": status, "duration_ms": 1.0})
    assert code == 200, body


def upstream_post(upstream: str, path: str, body: dict[str, Any],
                  timeout: float = 60.0) -> tuple[int, Any]:
    host, port = upstream.removeprefix("http://").split(":")
    return post_json(host, int(port), path, body, timeout)


def chat(grant: dict[str, Any], prompt: str = "What is 2+2? Reply with just the number."
         ) -> str:
    """A deterministic chat completion sent straight to the lease's upstream."""
    status, body = upstream_post(grant["upstream"], "/v1/chat/completions", {
        "model": grant["served_model_name"], "temperature": 0, "seed": 42, "max_tokens": 10,
        "messages": [{"role": "user", "content": prompt}]})
    assert status == 200, body
    return str(body["choices"][0]["message"]["content"])


def leased_chat(d: DaemonProcess, model: str) -> tuple[str, dict[str, Any]]:
    """Lease, ask, release; returns the answer and the grant."""
    code, grant = lease(d, model)
    assert code == 200, grant
    try:
        return chat(grant), grant
    finally:
        release(d, grant["lease_id"])


def set_faults(upstream_port: int, set_: dict[str, Any] | None = None,
               clear: list[str] | None = None) -> Any:
    status, body = upstream_post(f"http://127.0.0.1:{upstream_port}", "/_sim/faults",
                                 {"set": set_ or {}, "clear": clear or []})
    assert status == 200, body
    return body


def model_gpu_mib(d: DaemonProcess, pid: int | None) -> int:
    """MiB the child group led by ``pid`` holds on the simulated GPUs (0 when gone)."""
    if pid is None:
        return 0
    usage = child_usage(SimGpuProbe(d.gpu_dir), pids_in_group(pid))
    assert usage is not None
    return sum(usage.values())


def gpu_used_mib(d: DaemonProcess) -> int:
    return sum(g.used_mib for g in SimGpuProbe(d.gpu_dir).gpus())
