"""The simulator as a process: API, process tree, simulated GPU memory, sleep semantics.

Every test runs real `llmux-sim-vllm serve` processes (SimProcess) on free ports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from llmux_testkit.sim import SimProcess, free_port, init_gpus, wait_for
from vllmsim.gpustate import GpuState

FULL = int(0.9 * 81920)
RESIDUE = 1341


def sim(tmp_path: Path, name: str = "sim", **kw: Any) -> SimProcess:
    kw.setdefault("log_path", tmp_path / f"{name}.log")
    return SimProcess(**kw)


def complete(s: SimProcess, prompt: str = "hello", **body: Any) -> requests.Response:
    req = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    req.update(body)
    return s.post("/v1/completions", req)


# -- the OpenAI client -------------------------------------------------------------------


def test_openai_client_lists_chats_completes_and_streams(tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    with sim(tmp_path, served_model_name="qwen") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", timeout=30)
        assert [m.id for m in client.models.list()] == ["qwen"]
        r = client.chat.completions.create(model="qwen", max_tokens=6, temperature=0,
                                           messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content
        assert r.usage is not None and r.usage.completion_tokens <= 6
        c = client.completions.create(model="qwen", prompt="once upon", max_tokens=5,
                                      temperature=0)
        assert c.choices[0].text and c.choices[0].finish_reason in ("length", "stop")
        stream = client.chat.completions.create(
            model="qwen", max_tokens=5, temperature=0, stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "hi"}])
        parts, usage = [], None
        for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                usage = chunk.usage
        assert "".join(parts) == r.choices[0].message.content[: len("".join(parts))]
        assert usage is not None and usage.completion_tokens == 5
        cs = client.completions.create(model="qwen", prompt="once upon", max_tokens=5,
                                       temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in cs) == c.choices[0].text
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_embeddings_on_an_embedding_model(tmp_path: Path) -> None:
    with sim(tmp_path, model="BAAI/bge-m3", args=["--runner", "pooling"]) as s:
        r = s.post("/v1/embeddings", {"model": "BAAI/bge-m3", "input": ["a", "b c"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [d["index"] for d in body["data"]] == [0, 1]
        assert len(body["data"][0]["embedding"]) == 256
        again = s.post("/v1/embeddings", {"model": "BAAI/bge-m3", "input": ["a"]}).json()
        assert again["data"][0]["embedding"] == body["data"][0]["embedding"]
        assert body["usage"]["prompt_tokens"] == 3
        assert complete(s).status_code == 404, "a pooling model has no completions route"


def test_generation_model_has_no_embeddings_route(tmp_path: Path) -> None:
    with sim(tmp_path) as s:
        r = s.post("/v1/embeddings", {"input": "x"})
        assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})


def test_different_models_give_different_text(tmp_path: Path) -> None:
    with sim(tmp_path, "a", served_model_name="a") as a, \
            sim(tmp_path, "b", served_model_name="b") as b:
        ta = complete(a, max_tokens=20).json()["choices"][0]["text"]
        tb = complete(b, max_tokens=20).json()["choices"][0]["text"]
        assert ta and tb and ta != tb
        assert complete(a, max_tokens=20).json()["choices"][0]["text"] == ta


def test_dev_endpoints_exist_only_in_dev_mode(tmp_path: Path) -> None:
    with sim(tmp_path, dev_mode=False, fault_api=False) as s:
        for path in ("/sleep", "/wake_up", "/collective_rpc", "/reset_prefix_cache"):
            assert s.post(path).status_code == 404, path
        assert s.get("/is_sleeping").status_code == 404
        assert s.get("/_sim/state").status_code == 404
        assert complete(s).status_code == 200


def test_keep_alive_and_chunked_request_bodies(tmp_path: Path) -> None:
    with sim(tmp_path) as s:
        body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as c:
            for _ in range(2):  # two requests on one connection
                c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                          + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
                head = b""
                while b"\r\n\r\n" not in head:
                    head += c.recv(65536)
                assert head.startswith(b"HTTP/1.1 200 OK"), head
                hdr, rest = head.split(b"\r\n\r\n", 1)
                length = int(next(h for h in hdr.split(b"\r\n")
                              if h.lower().startswith(b"content-length")).split(b":")[1])
                while len(rest) < length:
                    rest += c.recv(65536)
                assert json.loads(rest[:length])["object"] == "text_completion"


def test_garbage_http_gets_400_not_a_traceback(tmp_path: Path) -> None:
    with sim(tmp_path) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as c:
            c.sendall(b"NONSENSE\r\n\r\n")
            data = c.recv(65536)
        assert data.startswith(b"HTTP/1.1 400")
        assert "Traceback" not in s.log()
        assert s.get("/health").status_code == 200


# -- process tree and simulated GPU memory -----------------------------------------------


def test_engine_child_holds_the_memory_in_the_same_group(tmp_path: Path) -> None:
    state = GpuState(init_gpus(tmp_path / "gpus"))
    with sim(tmp_path, gpu_state=state.dir) as s:
        engine = s.engine_pid()
        assert engine != s.pid
        assert psutil.Process(engine).ppid() == s.pid
        assert os.getpgid(engine) == os.getpgid(s.pid) == s.pid
        assert state.usage_by_pid() == {engine: {0: FULL}}
        assert state.entries()[engine]["pgid"] == s.pid
    assert state.usage_by_pid() == {}, "a clean stop releases the memory"


def test_engine_child_dies_with_a_killed_api_server(tmp_path: Path) -> None:
    state = GpuState(init_gpus(tmp_path / "gpus"))
    with sim(tmp_path, gpu_state=state.dir) as s:
        engine = psutil.Process(s.engine_pid())
        s.signal(signal.SIGKILL)
        s.wait_exit(30)
        wait_for(lambda: not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE,
                 30, "the engine child to die")
        assert [g.used_mib for g in state.snapshot()] == [0]


def test_second_start_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    state = GpuState(init_gpus(tmp_path / "gpus"))
    with sim(tmp_path, "a", gpu_state=state.dir):
        b = sim(tmp_path, "b", gpu_state=state.dir, gpu_memory_utilization=0.5).start()
        try:
            assert b.wait_exit(60) == 1
        finally:
            b.stop()
        log = b.log()
        assert ("ValueError: Free memory on device cuda:0 (8.0/80.0 GiB) on startup is less "
                "than desired GPU memory utilization (0.5, 40.0 GiB). Decrease GPU memory "
                "utilization or reduce GPU memory used by other processes.") in log
        assert "Engine core initialization failed" in log
        assert len(state.usage_by_pid()) == 1


def test_sleep_leaves_the_residue_and_wake_restores(tmp_path: Path) -> None:
    state = GpuState(init_gpus(tmp_path / "gpus"))
    with sim(tmp_path, gpu_state=state.dir) as s:
        engine = s.engine_pid()
        for level in (1, 2):
            assert s.post(f"/sleep?level={level}").status_code == 200
            assert state.usage_by_pid()[engine] == {0: RESIDUE}
            assert [g.used_mib for g in state.snapshot()] == [RESIDUE]
            assert s.post("/wake_up").status_code == 200
            assert state.usage_by_pid()[engine] == {0: FULL}
        # the CLI shows the same
        out = subprocess.run([sys.executable, "-m", "vllmsim.cli", "gpus", "show",
                              str(state.dir), "--json"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        assert json.loads(out)["gpus"][0]["used_mib"] == FULL


def test_weights_only_wake_holds_residue_plus_weights(tmp_path: Path) -> None:
    state = GpuState(init_gpus(tmp_path / "gpus"))
    with sim(tmp_path, gpu_state=state.dir, args=["--sim-size-gib", "10"]) as s:
        engine = s.engine_pid()
        s.post("/sleep?level=2")
        assert s.post("/wake_up?tags=weights").json()["status"] == "sleeping"
        assert state.usage_by_pid()[engine] == {0: RESIDUE + 10 * 1024}
        assert s.post("/wake_up?tags=kv_cache").json()["status"] == "awake"
        assert state.usage_by_pid()[engine] == {0: FULL}


def test_without_sleep_mode_sleep_frees_nothing_but_flips_state(tmp_path: Path) -> None:
    state = GpuState(init_gpus(tmp_path / "gpus"))
    with sim(tmp_path, gpu_state=state.dir, sleep_mode=False) as s:
        engine = s.engine_pid()
        assert s.post("/sleep?level=2").json() == {"status": "sleeping", "level": 2}
        assert s.get("/is_sleeping").json() == {"is_sleeping": True}
        assert state.usage_by_pid()[engine] == {0: FULL}
        s.post("/wake_up")
        assert "!" not in complete(s).json()["choices"][0]["text"], "nothing was discarded"


def test_wake_that_no_longer_fits_is_500_and_stays_asleep(tmp_path: Path) -> None:
    state = GpuState(init_gpus(tmp_path / "gpus"))
    with sim(tmp_path, "a", gpu_state=state.dir) as a:
        a.post("/sleep?level=1")
        with sim(tmp_path, "b", gpu_state=state.dir, gpu_memory_utilization=0.5):
            r = a.post("/wake_up")
            assert r.status_code == 500
            assert r.json()["error"]["type"] == "InternalServerError"
            assert "out of memory" in r.json()["error"]["message"]
            assert r.headers.get("connection") == "close"
            assert a.get("/is_sleeping").json() == {"is_sleeping": True}
            assert state.usage_by_pid()[a.engine_pid()] == {0: RESIDUE}
        assert a.post("/wake_up").json() == {"status": "awake", "tags": None}
        assert state.usage_by_pid()[a.engine_pid()] == {0: FULL}


def test_level1_sleep_really_holds_the_weights_in_host_ram(tmp_path: Path) -> None:
    # 2 GiB model x factor 1/32 = 64 MiB really allocated in the engine child
    with sim(tmp_path, args=["--sim-size-gib", "2", "--sim-host-ram-factor", "0.03125"]) as s:
        engine = psutil.Process(s.engine_pid())
        before = engine.memory_info().rss
        s.post("/sleep?level=1")
        assert s.state()["host_weights_bytes"] == 64 << 20
        assert engine.memory_info().rss - before >= 60 << 20
        s.post("/wake_up")
        assert s.state()["host_weights_bytes"] == 0
        assert engine.memory_info().rss - before < 32 << 20


def test_tensor_parallel_uses_the_visible_gpus(tmp_path: Path) -> None:
    state = GpuState(init_gpus(tmp_path / "gpus", count=4))
    with sim(tmp_path, gpu_state=state.dir, cuda_visible_devices="2,3",
             args=["--tensor-parallel-size", "2"]) as s:
        assert state.usage_by_pid()[s.engine_pid()] == {2: FULL, 3: FULL}
        s.post("/sleep?level=1")
        assert state.usage_by_pid()[s.engine_pid()] == {2: RESIDUE, 3: RESIDUE}


def test_too_few_visible_gpus_for_tp_is_a_failed_start(tmp_path: Path) -> None:
    s = sim(tmp_path, cuda_visible_devices="0", args=["-tp", "2"]).start()
    try:
        assert s.wait_exit(60) == 1
    finally:
        s.stop()
    assert "World size (2) is larger than the number of available GPUs (1)" in s.log()


def test_port_in_use_is_a_failed_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        s = sim(tmp_path, port=taken.getsockname()[1]).start()
        try:
            assert s.wait_exit(60) == 1
        finally:
            s.stop()
    assert "Address already in use" in s.log()


def test_usage_error_exits_2(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "vllmsim.cli", "serve", "m", "--sim-fault",
                        "bogus"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "unknown fault 'bogus'" in r.stderr


def test_gpus_init_and_show_cli(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "vllmsim.cli", "gpus"]
    d = str(tmp_path / "g")
    assert subprocess.run([*cli, "show", d], capture_output=True, timeout=60).returncode == 1
    subprocess.run([*cli, "init", d, "--count", "2", "--total-mib", "1000"], check=True,
                   capture_output=True, timeout=60)
    out = subprocess.run([*cli, "show", d], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert out.count("1000") == 2


# -- sleep semantics ---------------------------------------------------------------------


def test_l2_wake_without_reload_serves_garbage(tmp_path: Path) -> None:
    with sim(tmp_path) as s:
        good = complete(s).json()["choices"][0]["text"]
        s.post("/sleep?level=2")
        s.post("/wake_up")
        r = complete(s)
        assert r.status_code == 200
        assert set(r.json()["choices"][0]["text"]) == {"!"}
        assert s.post("/collective_rpc", {"method": "reload_weights"}).status_code == 200
        assert complete(s).json()["choices"][0]["text"] == good


def test_l1_wake_keeps_the_weights(tmp_path: Path) -> None:
    with sim(tmp_path) as s:
        good = complete(s).json()["choices"][0]["text"]
        s.post("/sleep?level=1")
        s.post("/wake_up")
        assert complete(s).json()["choices"][0]["text"] == good


def test_sleep_durations_follow_the_model_and_are_exported(tmp_path: Path) -> None:
    # 1 GiB at 4 GiB/s D2H = 0.25 s sleep; at 2 GiB/s H2D = 0.5 s wake (scale 1)
    with sim(tmp_path, time_scale=1.0,
             args=["--sim-size-gib", "1", "--sim-d2h-gibps", "4", "--sim-h2d-gibps", "2",
                   "--sim-load-s", "0", "--sim-warmup-s", "0"]) as s:
        s.post("/sleep?level=1")
        s.post("/wake_up")
        text = s.get("/metrics").text
        sums = {op: float(v) for op, v in re.findall(
            r'^vllm:sleep_mode_operation_duration_seconds_sum\{operation="(\w+)"\} (\S+)$',
            text, re.M)}
        assert sums["sleep"] >= 0.25
        assert sums["wake"] >= 0.5


def test_parked_request_keeps_the_server_alive_after_sigterm(tmp_path: Path) -> None:
    s = sim(tmp_path)
    with s:
        s.post("/sleep?level=1")
        c = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: s.state()["parked"] == 1, 30, "the request to park")
        s.signal(signal.SIGTERM)
        wait_for(lambda: "Shutting down" in s.log(), 30, "the server to start shutting down")
        with pytest.raises(subprocess.TimeoutExpired):
            s.wait_exit(2.0)  # stays alive while the parked client is there (as vLLM does)
        c.close()
        assert s.wait_exit(30) == 0


def test_sigterm_stops_cleanly_and_frees_memory(tmp_path: Path) -> None:
    state = GpuState(init_gpus(tmp_path / "gpus"))
    s = sim(tmp_path, gpu_state=state.dir)
    with s:
        s.signal(signal.SIGTERM)
        assert s.wait_exit(30) == 0
    assert state.usage_by_pid() == {}
    assert not list(state.procs.glob("*.json"))


def test_sleep_mode_wait_lets_running_requests_finish(tmp_path: Path) -> None:
    with sim(tmp_path, time_scale=1.0, args=["--sim-token-rate", "100", "--sim-load-s", "0",
                                             "--sim-warmup-s", "0"]) as s:
        result: dict[str, Any] = {}
        t = threading.Thread(target=lambda: result.update(r=complete(s, max_tokens=30)))
        t.start()
        wait_for(lambda: s.state()["running"] == 1, 30, "the request to run")
        assert s.post("/sleep?level=1&mode=wait").status_code == 200
        t.join(30)
        assert result["r"].json()["choices"][0]["finish_reason"] != "abort"
        s.post("/wake_up")


def test_api_key_is_enforced_on_v1_routes(tmp_path: Path) -> None:
    with sim(tmp_path, args=["--api-key", "secret"]) as s:
        assert s.get("/v1/models").status_code == 401
        assert s.get("/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200
        assert s.get("/health").status_code == 200


def test_free_port_helper_gives_a_bindable_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))


def test_a_dead_engine_child_takes_the_server_down(tmp_path: Path) -> None:
    with sim(tmp_path) as s:
        os.kill(s.engine_pid(), signal.SIGKILL)
        assert s.wait_exit(30) == 1
        assert "died unexpectedly" in s.log()


def test_sleep_mode_keep_pauses_running_requests_until_wake(tmp_path: Path) -> None:
    with sim(tmp_path, time_scale=1.0, args=["--sim-token-rate", "10", "--sim-load-s", "0",
                                             "--sim-warmup-s", "0"]) as s:
        result: dict[str, Any] = {}
        t = threading.Thread(target=lambda: result.update(
            r=complete(s, max_tokens=40, ignore_eos=True)))
        t.start()
        wait_for(lambda: s.state()["running"] == 1, 30, "the request to run")
        assert s.post("/sleep?level=1&mode=keep").status_code == 200
        t.join(1.0)
        assert t.is_alive(), "a kept request finished while the engine slept"
        assert s.state()["running"] == 1
        s.post("/wake_up")
        t.join(30)
        body = result["r"].json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 40


def test_a_gpu_that_does_not_exist_is_a_failed_start(tmp_path: Path) -> None:
    state = init_gpus(tmp_path / "gpus", count=2)
    s = sim(tmp_path, gpu_state=state, cuda_visible_devices="5").start()
    try:
        assert s.wait_exit(60) == 1
    finally:
        s.stop()
    assert "invalid device ordinal" in s.log()


def test_several_served_names_are_all_accepted(tmp_path: Path) -> None:
    with sim(tmp_path, args=["--served-model-name", "one", "two"]) as s:
        assert [m["id"] for m in s.get("/v1/models").json()["data"]] == ["one", "two"]
        assert complete(s, model="two").json()["model"] == "two"
        assert complete(s, model="three").status_code == 404


def test_idle_keep_alive_connections_are_closed_like_uvicorn(tmp_path: Path) -> None:
    env = dict(os.environ, VLLM_HTTP_TIMEOUT_KEEP_ALIVE="1", VLLM_SERVER_DEV_MODE="1")
    with sim(tmp_path, env=env) as s, \
            socket.create_connection(("127.0.0.1", s.port), timeout=30) as c:
        c.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(b'{"version":"0.32.0"}'):
            data += c.recv(65536)
        assert c.recv(65536) == b"", "an idle keep-alive connection should be closed"
