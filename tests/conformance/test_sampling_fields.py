"""Conformance of the sampling fields: the simulator honours what real vLLM honours.

Found by diffing request fields against real vLLM 0.32 (tests/realvllm): `n` (and
its 400 with greedy sampling),
`logprobs` (completions: an int; chat: `logprobs` + `top_logprobs`), `prompt_logprobs`,
`echo`, `stop` / `include_stop_str_in_output`, `top_k` / `top_p` (1 and ~0 make
sampling greedy), `return_token_ids`, and their validation (400). Each test would
pass against a server that silently drops its field only by accident: every one
asserts something the field changes. Shapes and relations only, never the words.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests

from .conftest import Backend
from .sse import parse_stream
from .test_conformance import chat, completion


def ok(r: requests.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


# -- n -----------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_n_gives_n_choices(backend: Backend, route: str) -> None:
    call = completion if route == "completions" else chat
    body = ok(call(backend, n=3, max_tokens=4, temperature=1.0, ignore_eos=True))
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 12


def test_n_times_a_batch_of_prompts(backend: Backend) -> None:
    body = ok(completion(backend, prompt=["a b", "c d e"], n=2, max_tokens=3,
                         temperature=1.0, ignore_eos=True))
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["completion_tokens"] == 12


def test_n_in_a_stream(backend: Backend) -> None:
    with requests.post(backend.url + "/v1/completions", stream=True, timeout=60, json={
        "model": backend.model, "prompt": "hello", "max_tokens": 3, "n": 2,
        "temperature": 1.0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }) as r:
        assert r.status_code == 200
        chunks, done = parse_stream(r)
    assert done
    finished = {c["choices"][0]["index"] for c in chunks
                if c["choices"] and c["choices"][0]["finish_reason"] is not None}
    assert finished == {0, 1}
    assert chunks[-1]["usage"]["completion_tokens"] == 6


# -- logprobs ------------------------------------------------------------------------------


def test_completion_logprobs(backend: Backend) -> None:
    body = ok(completion(backend, logprobs=2, max_tokens=4, ignore_eos=True))
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    assert set(lp) == {"text_offset", "token_logprobs", "tokens", "top_logprobs"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    if "\ufffd" not in choice["text"]:
        assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == sorted(lp["text_offset"])
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                 strict=True):
        assert value <= 0.0
        assert 2 <= len(top) <= 3 and token in top
        assert all(v <= 0.0 for v in top.values())
    # Greedy: the chosen token is the most likely one.
    assert all(lp["token_logprobs"][i] >= max(top.values()) - 1e-6
               for i, top in enumerate(lp["top_logprobs"]))


def test_completion_without_logprobs_has_none(backend: Backend) -> None:
    assert ok(completion(backend))["choices"][0]["logprobs"] is None


def test_chat_logprobs_and_top_logprobs(backend: Backend) -> None:
    body = ok(chat(backend, logprobs=True, top_logprobs=3, max_tokens=4, ignore_eos=True))
    (choice,) = body["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert {"token", "logprob", "bytes", "top_logprobs"} <= set(entry)
        assert entry["logprob"] <= 0.0
        assert len(entry["top_logprobs"]) == 3
        assert all({"token", "logprob", "bytes"} <= set(t) for t in entry["top_logprobs"])
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
    if "\ufffd" not in choice["message"]["content"]:   # a byte-fallback token: no match
        assert "".join(e["token"] for e in content) == choice["message"]["content"]
    plain = ok(chat(backend, logprobs=True, max_tokens=2, ignore_eos=True))
    assert all(e["top_logprobs"] == [] for e in plain["choices"][0]["logprobs"]["content"])
    assert ok(chat(backend))["choices"][0]["logprobs"] is None


def test_chat_logprobs_in_a_stream(backend: Backend) -> None:
    with requests.post(backend.url + "/v1/chat/completions", stream=True, timeout=60, json={
        "model": backend.model, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3, "temperature": 0, "ignore_eos": True, "stream": True,
        "logprobs": True, "top_logprobs": 1,
    }) as r:
        assert r.status_code == 200
        chunks, done = parse_stream(r)
    assert done
    with_lp = [c["choices"][0]["logprobs"] for c in chunks
               if c["choices"] and c["choices"][0].get("logprobs")]
    assert sum(len(lp["content"]) for lp in with_lp) == 3


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_prompt_logprobs(backend: Backend, route: str) -> None:
    call = completion if route == "completions" else chat
    body = ok(call(backend, prompt_logprobs=1, max_tokens=2))
    plp = body["choices"][0]["prompt_logprobs"] if route == "completions" \
        else body["prompt_logprobs"]
    assert len(plp) == body["usage"]["prompt_tokens"]
    assert plp[0] is None
    for step in plp[1:]:
        assert 1 <= len(step) <= 2
        for token_id, info in step.items():
            assert int(token_id) >= 0
            assert set(info) == {"logprob", "rank", "decoded_token"}
            assert info["logprob"] <= 0.0 and info["rank"] >= 1
    assert body["usage"]["prompt_tokens"] >= 2


# -- echo, stop ----------------------------------------------------------------------------


def test_echo_puts_the_prompt_first(backend: Backend) -> None:
    text = ok(completion(backend, prompt="hello world", echo=True))["choices"][0]["text"]
    assert text.startswith("hello world")
    plain = ok(completion(backend, prompt="hello world"))["choices"][0]["text"]
    assert text == "hello world" + plain


def _greedy_text(backend: Backend) -> str:
    text: str = ok(completion(backend, max_tokens=12, ignore_eos=True))["choices"][0]["text"]
    assert len(text) >= 6, text
    return text


@pytest.mark.parametrize("keep", [False, True])
def test_stop_strings_end_the_text(backend: Backend, keep: bool) -> None:
    full = _greedy_text(backend)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full.find(stop)
    body = ok(completion(backend, max_tokens=12, ignore_eos=True, stop=[stop],
                         include_stop_str_in_output=keep))
    (choice,) = body["choices"]
    assert choice["text"] == (full[:cut + len(stop)] if keep else full[:cut])
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)


# -- greedy by top_k / top_p ---------------------------------------------------------------


@pytest.mark.parametrize("knob", [{"top_k": 1}, {"top_p": 1e-9}])
def test_top_k_1_or_tiny_top_p_is_greedy(backend: Backend, knob: dict[str, Any]) -> None:
    greedy = _greedy_text(backend)
    for _ in range(2):
        body = ok(completion(backend, max_tokens=12, ignore_eos=True, temperature=1.0, **knob))
        assert body["choices"][0]["text"] == greedy


# -- token ids -----------------------------------------------------------------------------


def test_return_token_ids(backend: Backend) -> None:
    body = ok(completion(backend, return_token_ids=True, max_tokens=3, ignore_eos=True))
    (choice,) = body["choices"]
    assert len(choice["token_ids"]) == 3
    assert len(choice["prompt_token_ids"]) == body["usage"]["prompt_tokens"]
    assert all(isinstance(t, int) and t >= 0 for t in choice["token_ids"])
    assert ok(completion(backend))["choices"][0]["token_ids"] is None


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("route,fields", [
    ("completions", {"n": 0}),
    ("completions", {"n": 2, "temperature": 0}),    # vLLM: greedy sampling needs n = 1
    ("chat", {"n": 3, "temperature": 0.0}),
    ("completions", {"logprobs": 21}),
    ("completions", {"logprobs": -1}),
    ("completions", {"top_p": 0}),
    ("completions", {"top_p": 1.5}),
    ("completions", {"top_k": -2}),
    ("completions", {"prompt_logprobs": 1, "stream": True}),
    ("chat", {"top_logprobs": 2}),
    ("chat", {"logprobs": True, "top_logprobs": 21}),
    ("chat", {"n": -1}),
])
def test_bad_sampling_fields_are_400(backend: Backend, route: str,
                                     fields: dict[str, Any]) -> None:
    call = completion if route == "completions" else chat
    r = call(backend, **fields)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
