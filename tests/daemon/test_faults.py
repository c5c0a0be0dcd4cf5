"""Every child failure ends in a consistent state, a clear error, and a working next request."""

from __future__ import annotations

import threading
from typing import Any

from llmux_testkit.daemon import sim_model

from .daemon_helpers import (
    lease,
    leased_chat,
    model_gpu_mib,
    release,
    set_faults,
    upstream_post,
)

RESIDUE = 2048
FAST_FAIL = {"daemon": {"sleep_timeout_secs": 2.0, "wake_timeout_secs": 5.0}}


def two_models(make_daemon, a_level: int = 1, b_level: int = 1, a_extra: Any = (),
               config: dict | None = None):
    models = {"a": sim_model(sleep_level=a_level, extra_args=list(a_extra)),
              "b": sim_model(sleep_level=b_level)}
    return make_daemon(models, config=config or FAST_FAIL)


def assert_escalated(d, why: str) -> None:
    a = d.status("a")
    assert a["state"] == "stopped" and a["pid"] is None, a
    assert why in (a["last_error"] or ""), a["last_error"]
    assert "escalating to level 3" in a["last_error"]


def test_sleep_that_frees_nothing_is_detected_and_escalated_to_l3(make_daemon):
    d = two_models(make_daemon, a_extra=["--sim-fault", "sleep_no_free"])
    answer, _ = leased_chat(d, "a")
    a_pid = d.status("a")["pid"]
    leased_chat(d, "b")
    assert_escalated(d, "freed too little")
    assert model_gpu_mib(d, a_pid) == 0
    assert d.status("b")["state"] == "active"
    again, _ = leased_chat(d, "a")            # cold start works
    assert again == answer


def test_sleep_500_escalates_to_l3_and_the_switch_goes_on(make_daemon):
    d = two_models(make_daemon)
    leased_chat(d, "a")
    set_faults(d.status("a")["port"], {"sleep_500": True})
    leased_chat(d, "b")
    assert_escalated(d, "500")
    leased_chat(d, "a")
    assert d.status("a")["state"] == "active"


def test_hung_sleep_times_out_and_escalates_to_l3(make_daemon):
    d = two_models(make_daemon)
    leased_chat(d, "a")
    set_faults(d.status("a")["port"], {"sleep_hang": True})
    leased_chat(d, "b")
    assert_escalated(d, "sleep at level 1 failed")
    leased_chat(d, "a")


def wake_failure(make_daemon, level: int, fault: str) -> None:
    d = two_models(make_daemon, a_level=level)
    answer, _ = leased_chat(d, "a")
    set_faults(d.status("a")["port"], {fault: True})
    leased_chat(d, "b")
    assert d.status("a")["state"] == "sleeping"
    code, body = lease(d, "a")
    assert code == 503, body
    assert body["error"]["code"] == "model_failed"
    assert "wake" in body["error"]["message"]
    a = d.wait_state("a", "stopped")
    assert "wake" in a["last_error"]
    again, _ = leased_chat(d, "a")         # the next request cold-starts it
    assert again == answer
    assert d.status("a")["restarts"] == 1


def test_wake_500_stops_the_model_and_the_next_request_cold_starts(make_daemon):
    wake_failure(make_daemon, 1, "wake_500")


def test_failed_l2_reload_stops_the_model_and_never_serves_it(make_daemon):
    wake_failure(make_daemon, 2, "reload_fail")


def test_crash_mid_stream_is_noticed_and_the_next_request_restarts(make_daemon):
    d = two_models(make_daemon)
    code, grant = lease(d, "a")
    assert code == 200
    port = d.status("a")["port"]
    set_faults(port, {"die_mid_stream": 2})
    body: object
    try:
        _status, body = upstream_post(grant["upstream"], "/v1/completions", {
            "model": "a", "prompt": "count", "max_tokens": 50, "stream": True})
    except Exception as exc:        # the stream breaks: that is the fault
        body = exc
    assert "[DONE]" not in str(body)
    a = d.wait_state("a", "stopped")
    assert "exited unexpectedly" in a["last_error"]
    assert a["in_flight"] == 0           # the dead child's lease was revoked
    release(d, grant["lease_id"])        # a late release is harmless
    leased_chat(d, "a")
    assert d.status("a")["state"] == "active"


def test_crash_at_start_gives_the_log_tail_then_holds_failed_until_start(make_daemon, tmp_path):
    marker = tmp_path / "broken"
    marker.write_text("x")
    wrapper = tmp_path / "vllm-wrapper"
    wrapper.write_text("#!/bin/sh\nif [ -e " + str(marker) + " ]; then\n"
                       "  echo 'simulated crash: CUDA out of memory'; exit 3\nfi\n"
                       "exec llmux-sim-vllm \"$@\"\n")
    wrapper.chmod(0o755)
    d = make_daemon({"a": sim_model()}, config={
        "vllm_command": str(wrapper),
        "daemon": {"max_start_failures": 3, "restart_backoff_secs": 0.2}})
    code, body = lease(d, "a")
    assert code == 503 and body["error"]["code"] == "model_failed", body
    assert "CUDA out of memory" in body["error"]["message"]
    assert "exited with code 3" in body["error"]["message"]
    for _ in range(5):
        code, body = lease(d, "a")
        if "held failed" in body.get("error", {}).get("message", ""):
            break
        assert code == 503, body
    a = d.status("a")
    assert (a["state"], a["failures"]) == ("failed", 3)
    assert code == 503 and "held failed" in body["error"]["message"]
    marker.unlink()
    code, status = d.request("POST", "/v1/models/a/start")
    assert code == 200 and status["state"] == "active", status
    leased_chat(d, "a")


def test_slow_start_timeout_and_queue_full(make_daemon):
    d = make_daemon({"a": sim_model(extra_args=["--sim-fault", "slow_start=30"])},
                    config={"policy": {"request_timeout_secs": 1.5},
                            "daemon": {"max_queue_per_model": 2}})
    results: list = []

    def one() -> None:
        results.append(lease(d, "a"))
    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    d.wait_for(lambda: d.status("a")["queued"] == 2, what="two queued waiters")
    code, body = lease(d, "a")
    assert code == 429 and body["error"]["code"] == "queue_full", body
    for t in threads:
        t.join(60)
    assert sorted(r[1]["error"]["code"] for r in results) == ["timeout", "timeout"]
    assert all(r[0] == 504 for r in results)
    assert d.status("a")["queued"] == 0


def test_kill_stops_now_and_the_next_request_restarts(make_daemon):
    d = two_models(make_daemon)
    leased_chat(d, "a")
    code, status = d.request("POST", "/v1/models/a/kill")
    assert code == 200 and status["state"] == "stopped", status
    leased_chat(d, "a")
