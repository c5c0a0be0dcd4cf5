"""Conformance: the simulator and real vLLM 0.32 answer the same way.

Each test runs against both backends (`backend` fixture): routes, status codes,
body shapes (never the words), SSE framing, the dev-mode sleep/wake endpoints and
their state changes, determinism at temperature 0, a request sent while asleep, and
a stream cut by /sleep. Where real vLLM on CPU cannot show a behaviour (it frees no
memory: sleep mode is CUDA-only), the test says so and checks the simulator alone.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest
import requests

from vllmsim.gpustate import GpuState

from .conftest import Backend
from .sse import events, parse_stream

COMPLETION_KEYS = {"id", "object", "created", "model", "choices", "usage"}
USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens"}


def completion(be: Backend, **body: Any) -> requests.Response:
    req = {"model": be.model, "prompt": "hello world", "max_tokens": 5, "temperature": 0}
    req.update(body)
    return be.post("/v1/completions", req)


def chat(be: Backend, **body: Any) -> requests.Response:
    req = {"model": be.model, "messages": [{"role": "user", "content": "hi there"}],
           "max_tokens": 5, "temperature": 0}
    req.update(body)
    return be.post("/v1/chat/completions", req)


def sleep_state(be: Backend) -> dict[str, float]:
    """vllm:engine_sleep_state{sleep_state=...} values from /metrics."""
    text = be.get("/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^vllm:engine_sleep_state\{[^}]*sleep_state="(\w+)"[^}]*\} (\S+)$', text, re.M)}


def sleep_op_count(be: Backend, op: str) -> float:
    text = be.get("/metrics").text
    name = "vllm:sleep_mode_operation_duration_seconds_count"
    pattern = "^" + re.escape(name) + r"\{operation=\"" + op + r"\"\} (\S+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def assert_openai_error(r: requests.Response, status: int, type_: str | None = None,
                        param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == status
    if type_ is not None:
        assert err["type"] == type_, err
    if param is not None:
        assert err["param"] == param, err
    return dict(err)


# -- plain routes ------------------------------------------------------------------------


def test_health_is_200_with_empty_body(backend: Backend) -> None:
    r = backend.get("/health")
    assert (r.status_code, r.content) == (200, b"")


def test_version(backend: Backend) -> None:
    r = backend.get("/version")
    assert r.status_code == 200
    assert r.json() == {"version": "0.32.0"}


def test_models_lists_the_served_name(backend: Backend) -> None:
    body = backend.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [backend.model]
    entry = body["data"][0]
    assert {"id", "object", "created", "owned_by", "root", "parent", "max_model_len",
            "permission"} <= set(entry)
    assert entry["object"] == "model"
    assert entry["owned_by"] == "vllm"
    assert entry["max_model_len"] == 256


def test_load(backend: Backend) -> None:
    r = backend.get("/load")
    assert r.status_code == 200
    assert set(r.json()) == {"server_load"}


def test_unknown_route_is_fastapi_404(backend: Backend) -> None:
    r = backend.get("/no/such/route")
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})


def test_wrong_method_is_405(backend: Backend) -> None:
    r = backend.post("/health")
    assert (r.status_code, r.json()) == (405, {"detail": "Method Not Allowed"})
    r = backend.get("/sleep")
    assert r.status_code == 405


def test_metrics_has_the_gauges_llmux_reads(backend: Backend) -> None:
    r = backend.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:engine_sleep_state"):
        pattern = "^" + re.escape(name) + r"\{[^}]*model_name=\"" + re.escape(backend.model)
        assert re.search(pattern, r.text, re.M), f"{name} missing from /metrics"
    assert sleep_state(backend) == {"awake": 1.0, "weights_offloaded": 0.0, "discard_all": 0.0}


# -- completions -------------------------------------------------------------------------


def test_completion_shape(backend: Backend) -> None:
    r = completion(backend, max_tokens=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= COMPLETION_KEYS
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == backend.model
    (choice,) = body["choices"]
    assert {"index", "text", "logprobs", "finish_reason", "stop_reason"} <= set(choice)
    assert choice["index"] == 0
    assert isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("length", "stop")
    assert set(body["usage"]) >= USAGE_KEYS
    u = body["usage"]
    assert 1 <= u["completion_tokens"] <= 5
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_chat_shape(backend: Backend) -> None:
    r = chat(backend, max_tokens=4)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= COMPLETION_KEYS
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("length", "stop")
    assert 1 <= body["usage"]["completion_tokens"] <= 4


def test_chat_without_model_uses_the_served_model(backend: Backend) -> None:
    r = backend.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                              "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == backend.model


def test_temperature_zero_is_deterministic(backend: Backend) -> None:
    a = completion(backend, prompt="the same prompt", max_tokens=8).json()
    b = completion(backend, prompt="the same prompt", max_tokens=8).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    c = chat(backend, max_tokens=8).json()
    d = chat(backend, max_tokens=8).json()
    assert c["choices"][0]["message"]["content"] == d["choices"][0]["message"]["content"]


def test_unknown_model_is_404(backend: Backend) -> None:
    err = assert_openai_error(completion(backend, model="no-such-model"), 404, "NotFoundError",
                              "model")
    assert "does not exist" in err["message"]
    assert_openai_error(chat(backend, model="no-such-model"), 404, "NotFoundError", "model")


def test_max_tokens_over_context_is_400(backend: Backend) -> None:
    err = assert_openai_error(completion(backend, max_tokens=500), 400, "BadRequestError",
                              "max_tokens")
    assert "max_model_len" in err["message"]
    assert_openai_error(chat(backend, max_tokens=500), 400, "BadRequestError", "max_tokens")


def test_max_tokens_zero_is_400(backend: Backend) -> None:
    assert_openai_error(chat(backend, max_tokens=0), 400, "BadRequestError", "max_tokens")


def test_bad_bodies_are_400(backend: Backend) -> None:
    r = backend.post("/v1/completions", data=b"not json",
                     headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    assert_openai_error(chat(backend, messages="bad"), 400, param="body.messages")
    assert_openai_error(backend.post("/v1/completions", {"model": backend.model}), 400,
                        "BadRequestError", "prompt")


def test_openai_routes_need_a_json_content_type(backend: Backend) -> None:
    body = b'{"model": "%s", "prompt": "hi", "max_tokens": 2}' % backend.model.encode()
    for ctype in ("application/x-www-form-urlencoded", None):
        headers = {"content-type": ctype} if ctype else {}
        r = requests.post(backend.url + "/v1/completions", data=body, headers=headers,
                          timeout=60)
        err = assert_openai_error(r, 400, "Bad Request")
        assert "Only 'application/json' is allowed" in err["message"]
    r = requests.post(backend.url + "/v1/completions", data=body, timeout=60,
                      headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_stream_options_without_stream_is_400(backend: Backend) -> None:
    r = completion(backend, stream_options={"include_usage": True})
    assert_openai_error(r, 400, "BadRequestError", "stream_options")


def test_prompt_longer_than_the_context_is_400(backend: Backend) -> None:
    r = completion(backend, prompt="word " * 400, max_tokens=2)
    err = assert_openai_error(r, 400, "BadRequestError", "input_tokens")
    assert "maximum context length is 256 tokens" in err["message"]


def test_lax_number_parsing(backend: Backend) -> None:
    assert completion(backend, max_tokens="2", temperature="0").status_code == 200
    assert_openai_error(completion(backend, temperature="hot"), 400, "Bad Request",
                        "body.temperature")
    assert_openai_error(completion(backend, max_tokens="x"), 400, "Bad Request",
                        "body.max_tokens")


def test_missing_messages_is_400(backend: Backend) -> None:
    r = backend.post("/v1/chat/completions", {"model": backend.model, "max_tokens": 2})
    assert_openai_error(r, 400, "Bad Request", "body.messages")


def test_a_batch_of_prompts_gets_one_choice_each(backend: Backend) -> None:
    body = completion(backend, prompt=["a", "b c"], max_tokens=2).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["finish_reason"] in ("length", "stop") for c in body["choices"])
    assert 2 <= body["usage"]["completion_tokens"] <= 4


def test_tokenize_shape(backend: Backend) -> None:
    r = backend.post("/tokenize", {"model": backend.model, "prompt": "hello world"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["count"] == len(body["tokens"]) >= 1
    assert body["max_model_len"] == 256


def test_completion_stream_framing_with_usage(backend: Backend) -> None:
    with requests.post(backend.url + "/v1/completions", stream=True, timeout=60, json={
        "model": backend.model, "prompt": "hi there", "max_tokens": 3, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks, done = parse_stream(r)
    assert done, "stream did not end with data: [DONE]"
    *tokens, usage = chunks
    assert tokens, "no token chunks"
    for c in tokens:
        assert c["object"] == "text_completion"
        assert c["model"] == backend.model
        (choice,) = c["choices"]
        assert isinstance(choice["text"], str)
    assert all(c["choices"][0]["finish_reason"] is None for c in tokens[:-1])
    assert tokens[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert len({c["id"] for c in chunks}) == 1
    assert usage["choices"] == []
    assert set(usage["usage"]) >= USAGE_KEYS
    assert usage["usage"]["completion_tokens"] == 3


def test_chat_stream_framing(backend: Backend) -> None:
    with requests.post(backend.url + "/v1/chat/completions", stream=True, timeout=60, json={
        "model": backend.model, "messages": [{"role": "user", "content": "hi there"}],
        "max_tokens": 3, "temperature": 0, "stream": True,
    }) as r:
        assert r.status_code == 200
        chunks, done = parse_stream(r)
    assert done
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert all("usage" not in c or c["usage"] is None for c in chunks), "usage without asking"


# -- sleep / wake (dev mode) ------------------------------------------------------------


def test_is_sleeping_false_when_awake(backend: Backend) -> None:
    assert backend.get("/is_sleeping").json() == {"is_sleeping": False}


def test_sleep_level1_and_wake(backend: Backend) -> None:
    sleeps, wakes = sleep_op_count(backend, "sleep"), sleep_op_count(backend, "wake")
    r = backend.post("/sleep?level=1")
    assert (r.status_code, r.json()) == (200, {"status": "sleeping", "level": 1})
    assert backend.get("/is_sleeping").json() == {"is_sleeping": True}
    assert sleep_state(backend) == {"awake": 0.0, "weights_offloaded": 1.0, "discard_all": 0.0}
    assert backend.get("/health").status_code == 200, "/health says nothing about sleep"
    r = backend.post("/wake_up")
    assert (r.status_code, r.json()) == (200, {"status": "awake", "tags": None})
    assert backend.get("/is_sleeping").json() == {"is_sleeping": False}
    assert sleep_state(backend)["awake"] == 1.0
    assert sleep_op_count(backend, "sleep") == sleeps + 1
    assert sleep_op_count(backend, "wake") == wakes + 1
    assert completion(backend).status_code == 200


def test_sleep_level2_and_the_four_step_wake(backend: Backend) -> None:
    r = backend.post("/sleep?level=2")
    assert (r.status_code, r.json()) == (200, {"status": "sleeping", "level": 2})
    assert sleep_state(backend) == {"awake": 0.0, "weights_offloaded": 0.0, "discard_all": 1.0}
    r = backend.post("/wake_up?tags=weights")
    assert (r.status_code, r.json()) == (200, {"status": "sleeping", "tags": ["weights"]})
    assert backend.get("/is_sleeping").json() == {"is_sleeping": True}
    r = backend.post("/collective_rpc", {"method": "reload_weights"})
    assert (r.status_code, r.json()) == (200, {"results": [None]})
    r = backend.post("/wake_up?tags=kv_cache")
    assert (r.status_code, r.json()) == (200, {"status": "awake", "tags": ["kv_cache"]})
    r = backend.post("/reset_prefix_cache")
    assert (r.status_code, r.json()) == (200, {"success": True})
    assert backend.get("/is_sleeping").json() == {"is_sleeping": False}
    assert completion(backend).status_code == 200


def test_sleep_level0_pauses_only(backend: Backend) -> None:
    r = backend.post("/sleep?level=0")
    assert (r.status_code, r.json()) == (200, {"status": "sleeping", "level": 0})
    assert backend.get("/is_sleeping").json() == {"is_sleeping": True}
    assert sleep_state(backend) == {"awake": 0.0, "weights_offloaded": 0.0, "discard_all": 0.0}
    assert backend.post("/wake_up").json() == {"status": "awake", "tags": None}


def test_wake_when_awake_is_a_no_op(backend: Backend) -> None:
    assert backend.post("/wake_up").json() == {"status": "awake", "tags": None}


@pytest.mark.parametrize("query", ["level=3", "level=-1", "level=abc", "level=1&mode=bogus"])
def test_bad_sleep_query_is_400(backend: Backend, query: str) -> None:
    assert_openai_error(backend.post(f"/sleep?{query}"), 400, "Bad Request")
    assert backend.get("/is_sleeping").json() == {"is_sleeping": False}


def test_collective_rpc_errors(backend: Backend) -> None:
    url = backend.url + "/collective_rpc"
    assert_openai_error(requests.post(url, data=b"xx", timeout=30), 400, "Bad Request")
    assert_openai_error(requests.post(url, json=[1], timeout=30), 400, "Bad Request")
    assert_openai_error(requests.post(url, json={}, timeout=30), 400, "Bad Request")
    err = assert_openai_error(requests.post(url, json={"method": "no_such_method"}, timeout=30),
                              500, "InternalServerError")
    assert "no_such_method" in err["message"]


def test_request_sent_while_asleep_waits_for_wake(backend: Backend) -> None:
    assert backend.post("/sleep?level=1").status_code == 200
    result: dict[str, Any] = {}

    def send() -> None:
        result["r"] = completion(backend, max_tokens=3)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    t.join(3.0)
    assert t.is_alive(), "a request to a sleeping engine answered instead of waiting"
    assert backend.post("/wake_up").status_code == 200
    t.join(60.0)
    assert not t.is_alive(), "the parked request was not served after wake"
    r = result["r"]
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_stream_running_at_sleep_ends_with_abort(backend: Backend) -> None:
    with requests.post(backend.url + "/v1/completions", stream=True, timeout=60, json={
        "model": backend.model, "prompt": "hi", "max_tokens": 240, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }) as r:
        assert r.status_code == 200
        it = events(r)
        first = [next(it), next(it)]  # the stream is running
        assert all(e != "[DONE]" for e in first)
        s = backend.post("/sleep?level=1")
        assert (s.status_code, s.json()) == (200, {"status": "sleeping", "level": 1})
        rest = list(it)
    assert rest[-1] == "[DONE]"
    import json

    chunks = [json.loads(e) for e in rest[:-1]]
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[-1]["choices"][0]["finish_reason"] == "abort"
    assert chunks[-1]["usage"]["completion_tokens"] < 240
    assert backend.post("/wake_up").status_code == 200


# -- memory: the simulator alone ---------------------------------------------------------


def test_sleep_releases_gpu_memory_to_the_residue(backend: Backend) -> None:
    if backend.kind == "real":
        pytest.skip("real vLLM on CPU cannot release memory (sleep mode is CUDA-only); "
                    "the simulator's memory model is checked alone")
    assert backend.sim is not None
    state = GpuState(backend.sim.state()["gpus"] and _state_dir(backend))
    engine_pid = backend.sim.engine_pid()
    full = state.usage_by_pid()[engine_pid][0]
    assert full == int(0.9 * 81920)
    assert backend.post("/sleep?level=1").status_code == 200
    assert state.usage_by_pid()[engine_pid] == {0: 1341}
    assert backend.post("/wake_up").status_code == 200
    assert state.usage_by_pid()[engine_pid] == {0: full}


def _state_dir(be: Backend) -> str:
    assert be.sim is not None
    argv = be.sim.argv
    return argv[argv.index("--sim-gpu-state") + 1]
