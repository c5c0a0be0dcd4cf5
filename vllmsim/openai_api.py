"""The OpenAI routes of the simulator: models, completions, chat, embeddings.

Bodies, SSE framing and validation errors follow vLLM 0.32 as measured (see
docs/simulator.md); the words are fake but deterministic (textgen.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from typing import TYPE_CHECKING

from vllmsim import sampling, textgen
from vllmsim.errors import (
    NOT_FOUND,
    SimHttpError,
    bad_request,
    not_found_model,
    openai_error,
    validation_error,
)
from vllmsim.httpio import Request, Responder, dumps

if TYPE_CHECKING:
    from vllmsim.engine import Engine, Handle
    from vllmsim.server import SimServer

FINGERPRINT = "vllm-0.32.0-sim"


def _input_repr(value: object) -> object:
    """How pydantic shows a large input in an error: dicts as '<dict of N items>'."""
    return f"<dict of {len(value)} items>" if isinstance(value, dict) else value


def parse_body(req: Request) -> dict[str, object]:
    """The JSON object body, or vLLM's validation error.

    vLLM's OpenAI routes accept only `Content-Type: application/json` (a proxy that
    drops the header gets a 400 from real vLLM, so it gets one here too).
    """
    ctype = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise SimHttpError(400, openai_error(
            400, "1 validation error:\n  Unsupported Media Type: Only 'application/json' "
            "is allowed", "Bad Request", None))
    try:
        body = req.json()
    except (ValueError, UnicodeDecodeError) as e:
        err = str(e).split(":")[0] if str(e) else "Expecting value"
        raise validation_error("json_invalid", "body.0", "JSON decode error",
                               "<dict of 0 items>", {"error": err}) from None
    if not isinstance(body, dict):
        raise validation_error(
            "model_attributes_type", "body",
            "Input should be a valid dictionary or object to extract fields from", body)
    return body


def _check_model(srv: SimServer, body: dict[str, object]) -> str:
    model = body.get("model")
    names = srv.opts.served_model_names
    if model is None:
        return names[0]
    if not isinstance(model, str) or model not in names:
        raise not_found_model(model, names)
    return model


def _int_field(body: dict[str, object], key: str) -> int | None:
    """An optional integer field, parsed as pydantic's lax mode does ("5" is fine)."""
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            raise validation_error(
                "int_parsing", f"body.{key}",
                "Input should be a valid integer, unable to parse string as an integer", v,
            ) from None
    if isinstance(v, bool) or not isinstance(v, int | float) or int(v) != v:
        raise validation_error("int_type", f"body.{key}", "Input should be a valid integer", v)
    return int(v)


def _max_tokens(srv: SimServer, body: dict[str, object], prompt_tokens: int) -> int:
    mt = _int_field(body, "max_completion_tokens")
    if mt is None:
        mt = _int_field(body, "max_tokens")
    limit = srv.opts.max_model_len
    if prompt_tokens >= limit:
        seen = min(prompt_tokens, limit + 1)
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, your prompt "
            f"contains at least {seen} input tokens, which exceeds this limit even without "
            f"any output tokens. Please reduce the length of the input prompt. "
            f"(parameter=input_tokens, value={seen})",
            "input_tokens",
        )
    if mt is not None:
        if mt < 1:
            raise bad_request(
                f"max_tokens must be at least 1, got {mt}. (parameter=max_tokens, value={mt})",
                "max_tokens",
            )
        if mt > limit:
            raise bad_request(
                f"max_tokens={mt} cannot be greater than max_model_len={limit}. Please "
                f"request fewer output tokens. (parameter=max_tokens, value={mt})",
                "max_tokens",
            )
    room = limit - prompt_tokens
    return room if mt is None else min(mt, room)


def _sampling(body: dict[str, object]) -> tuple[float, int | None]:
    t = body.get("temperature")
    if t is None:
        temperature = 1.0
    elif isinstance(t, int | float) and not isinstance(t, bool):
        temperature = float(t)
    elif isinstance(t, str):
        try:
            temperature = float(t.strip())
        except ValueError:
            raise validation_error(
                "float_parsing", "body.temperature",
                "Input should be a valid number, unable to parse string as a number", t,
            ) from None
    else:
        raise validation_error("float_type", "body.temperature",
                               "Input should be a valid number", t)
    return temperature, _int_field(body, "seed")


def _stream_opts(body: dict[str, object]) -> tuple[bool, bool]:
    stream = bool(body.get("stream"))
    so = body.get("stream_options")
    include_usage = isinstance(so, dict) and bool(so.get("include_usage"))
    if so is not None and not stream:
        raise bad_request("Stream options can only be defined when `stream=True`. "
                          "(parameter=stream_options)", "stream_options")
    return stream, include_usage


def usage_obj(prompt: int, completion: int, *, full: bool = True) -> dict[str, object]:
    u: dict[str, object] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    if full:
        u["prompt_tokens_details"] = None
        u["completion_tokens_details"] = None
    return u


async def models(srv: SimServer, req: Request, resp: Responder) -> None:
    now = int(time.time())
    data = [
        {
            "id": name,
            "object": "model",
            "created": now,
            "owned_by": "vllm",
            "root": srv.opts.model,
            "parent": None,
            "max_model_len": srv.opts.max_model_len,
            "permission": [{
                "id": f"modelperm-{secrets.token_hex(8)}",
                "object": "model_permission",
                "created": now,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }],
        }
        for name in srv.opts.served_model_names
    ]
    await resp.send_json(200, {"object": "list", "data": data})


def _one_prompt(prompt: object) -> tuple[str, int] | None:
    if isinstance(prompt, str) and prompt:
        return prompt, max(1, textgen.count_tokens(prompt))
    if isinstance(prompt, list) and prompt and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        return " ".join(map(str, prompt)), len(prompt)
    return None


def _prompts_of(body: dict[str, object]) -> list[tuple[str, int]]:
    """(text, tokens) per prompt: a string, token ids, or a list of either (batch)."""
    prompt = body.get("prompt")
    if prompt is None or prompt == "" or prompt == []:
        raise bad_request(
            "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)",
            "prompt",
        )
    one = _one_prompt(prompt)
    if one is not None:
        return [one]
    if isinstance(prompt, list):
        many = [_one_prompt(p) for p in prompt]
        if all(m is not None for m in many):
            return [m for m in many if m is not None]
    raise validation_error("string_type", "body.prompt", "Input should be a valid string", prompt)


async def completions(srv: SimServer, req: Request, resp: Responder) -> None:
    if srv.opts.embedding:
        raise NOT_FOUND
    body = parse_body(req)
    model = _check_model(srv, body)
    await _generate(srv, req, resp, body, model, _prompts_of(body), chat=False)


async def chat(srv: SimServer, req: Request, resp: Responder) -> None:
    if srv.opts.embedding:
        raise NOT_FOUND
    body = parse_body(req)
    messages = body.get("messages")
    if not isinstance(messages, list):
        if messages is None:
            raise validation_error("missing", "body.messages", "Field required",
                                   _input_repr(body))
        raise validation_error("list_type", "body.messages", "Input should be a valid list",
                               messages)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise validation_error("missing", f"body.messages.{i}.role", "Field required", m)
    model = _check_model(srv, body)
    prompt = textgen.chat_prompt_text(messages)
    ptoks = textgen.chat_prompt_tokens(messages)
    await _generate(srv, req, resp, body, model, [(prompt, ptoks)], chat=True)


def _choice(chat: bool, index: int, text: str, finish: str,
            stop_reason: str | None = None) -> dict[str, object]:
    if chat:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text, "refusal": None,
                        "annotations": None, "audio": None, "function_call": None,
                        "tool_calls": [], "reasoning": None},
            "logprobs": None, "finish_reason": finish, "stop_reason": stop_reason,
            "token_ids": None,
        }
    return {
        "index": index, "text": text, "logprobs": None, "finish_reason": finish,
        "stop_reason": stop_reason, "token_ids": None, "prompt_logprobs": None,
        "prompt_token_ids": None,
    }


def _choice_extras(srv_model: str, samp: sampling.Sampling, prompt: tuple[str, int],
                   tokens: list[str], chat: bool, echo_len: int) -> dict[str, object]:
    """The fields a choice carries only when asked: logprobs, token ids, prompt logprobs."""
    text, ptoks = prompt
    extra: dict[str, object] = {}
    if samp.logprobs is not None:
        if chat:
            extra["logprobs"] = {"content": sampling.chat_logprob_entries(
                srv_model, text, tokens, samp.logprobs, samp.greedy)}
        else:
            extra["logprobs"] = sampling.completion_logprobs(
                srv_model, text, tokens, samp.logprobs, samp.greedy, offset=echo_len)
    if samp.token_ids:
        extra["token_ids"] = [sampling.token_id(t) for t in tokens]
        if not chat:
            extra["prompt_token_ids"] = [sampling.token_id(t)
                                         for t in sampling.prompt_tokens(text, ptoks)]
    if samp.prompt_logprobs is not None and not chat:
        extra["prompt_logprobs"] = sampling.prompt_logprobs(srv_model, text, ptoks,
                                                            samp.prompt_logprobs)
    return extra


async def _generate(srv: SimServer, req: Request, resp: Responder, body: dict[str, object],
                    model: str, prompts: list[tuple[str, int]], *, chat: bool) -> None:
    ptoks = sum(p[1] for p in prompts)
    max_tokens = min(_max_tokens(srv, body, p[1]) for p in prompts)
    temperature, seed = _sampling(body)
    stream, include_usage = _stream_opts(body)
    samp = sampling.parse(body, chat=chat, stream=stream)
    if samp.greedy:
        temperature = 0.0
    elif temperature == 0:
        if samp.n > 1:   # vLLM's SamplingParams._verify_greedy_sampling
            raise bad_request(f"n must be 1 when using greedy sampling, got {samp.n}.")
        samp = dataclasses.replace(samp, greedy=True)
    engine = srv.engine
    t_arrival = time.perf_counter()
    handle = await engine.admit(resp.client_gone)
    if handle is None:
        resp.close_after = True
        return
    try:
        gens: list[textgen.Generation] = []
        gen_prompts: list[tuple[str, int]] = []
        for prompt in prompts:
            for j in range(samp.n):
                g = textgen.plan(model, prompt[0], max_tokens=max_tokens,
                                 temperature=temperature, seed=seed, chat=chat,
                                 garbage=not engine.weights_valid,
                                 ignore_eos=body.get("ignore_eos") is True, choice=j,
                                 min_tokens=samp.min_tokens)
                gens.append(sampling.apply_stop(g, samp.stop, samp.include_stop))
                gen_prompts.append(prompt)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(8)
        created = int(time.time())
        if stream:
            sent, finishes = await _stream(srv, resp, engine, handle, gens, rid, created, model,
                                           ptoks, include_usage, chat=chat, samp=samp,
                                           prompts=gen_prompts)
        else:
            longest = max(len(g.tokens) for g in gens)
            done = await _collect(engine, handle, longest)
            sent, finishes, choices = 0, [], []
            for i, g in enumerate(gens):
                k = min(done, len(g.tokens))
                finish = g.finish_reason if k == len(g.tokens) else "abort"
                sent += k
                finishes.append(finish)
                echo = gen_prompts[i][0] if samp.echo else ""
                c = _choice(chat, i, echo + "".join(g.tokens[:k]), finish,
                            g.stop_reason if finish == "stop" else None)
                c.update(_choice_extras(model, samp, gen_prompts[i], g.tokens[:k], chat,
                                        len(echo)))
                choices.append(c)
            obj: dict[str, object] = {
                "id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": model, "choices": choices,
                "service_tier": None, "system_fingerprint": FINGERPRINT,
                "usage": usage_obj(ptoks, sent),
            }
            if chat:
                text, count = prompts[0]
                obj.update({
                    "prompt_logprobs": None if samp.prompt_logprobs is None else
                    sampling.prompt_logprobs(model, text, count, samp.prompt_logprobs),
                    "prompt_token_ids": None if not samp.token_ids else
                    [sampling.token_id(t) for t in sampling.prompt_tokens(text, count)],
                })
            obj["kv_transfer_params"] = None
            await resp.send_json(200, obj)
        m = srv.metrics
        m.prompt_tokens += ptoks
        m.generation_tokens += sent
        for finish in finishes:
            m.success[finish] = m.success.get(finish, 0) + 1
        m.e2e.observe(time.perf_counter() - t_arrival)
    finally:
        engine.release(handle)
    srv.request_done()


async def _collect(engine: Engine, handle: Handle, n: int) -> int:
    """Non-streaming: wait as long as `n` tokens take; how many were made (abort: fewer)."""
    loop = asyncio.get_running_loop()
    timing = engine.timing
    deadline = loop.time() + timing.first_token_s()
    interval = timing.token_interval_s()
    # Sleep in slices so an abort (sleep with mode=abort) ends the request promptly.
    slice_tokens = max(1, int(0.05 / interval)) if interval > 0 else n
    sent = 0
    while sent < n:
        step = min(slice_tokens, n - sent)
        if not await engine.pace(handle, deadline + (step - 1) * interval):
            return sent
        sent += step
        deadline += step * interval
    return sent


async def _stream(srv: SimServer, resp: Responder, engine: Engine, handle: Handle,
                  gens: list[textgen.Generation], rid: str, created: int, model: str,
                  ptoks: int, include_usage: bool, *, chat: bool,
                  samp: sampling.Sampling | None = None,
                  prompts: list[tuple[str, int]] | None = None) -> tuple[int, list[str]]:
    """SSE: one chunk per token (prompts of a batch one after another), then usage, [DONE]."""
    loop = asyncio.get_running_loop()
    head = dumps({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                  "created": created, "model": model})[:-1]
    die_after = srv.opts.faults.value("die_mid_stream")
    await resp.start_stream()
    timing = engine.timing
    interval = timing.token_interval_s()
    chunks = 0
    sent_total = 0
    finishes: list[str] = []
    aborted = False
    first = True
    for index, gen in enumerate(gens):
        idx = str(index).encode()
        if chat:
            pre = b"data: " + head + b',"choices":[{"index":' + idx + b',"delta":{"content":'
            mid = b'},"logprobs":null,"finish_reason":'
            post = b',"token_ids":null}]}\n\n'
            await resp.chunk(b"data: " + head + b',"choices":[{"index":' + idx
                             + b',"delta":{"role":"assistant","content":""},"logprobs":null,'
                             b'"finish_reason":null}]}\n\n')
            chunks += 1
        else:
            pre = b"data: " + head + b',"choices":[{"index":' + idx + b',"text":'
            mid = b',"logprobs":null,"finish_reason":'
            post = b',"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}\n\n'
            if samp is not None and samp.echo and prompts is not None:
                await resp.chunk(pre + json.dumps(prompts[index][0]).encode() + mid
                                 + b"null" + post)
                chunks += 1
        want_lp = samp is not None and samp.logprobs is not None and prompts is not None
        echo_len = len(prompts[index][0]) if (samp and samp.echo and prompts) else 0
        deadline = loop.time() + timing.first_token_s()
        n = len(gen.tokens)
        finish = "abort" if aborted else gen.finish_reason
        sent = 0
        while sent < n and not aborted:
            if die_after is not None and chunks >= int(die_after):
                await srv.die(f"fault die_mid_stream: dying after {chunks} chunks")
            ok = await engine.pace(handle, deadline)
            if resp.client_gone():
                handle.aborted = True
                return sent_total + sent, [*finishes, "abort"]
            if not ok:
                finish, aborted = "abort", True
                break
            if first:
                srv.metrics.ttft.observe(timing.first_token_s())
                first = False
            tok = json.dumps(gen.tokens[sent])
            tok_mid = mid
            if want_lp:
                assert samp is not None and samp.logprobs is not None and prompts is not None
                ctx = prompts[index][0]
                lp: object
                if chat:
                    lp = {"content": sampling.chat_logprob_entries(
                        model, ctx, [gen.tokens[sent]], samp.logprobs, samp.greedy,
                        first=sent)}
                else:
                    lp = sampling.completion_logprobs(
                        model, ctx, [gen.tokens[sent]], samp.logprobs, samp.greedy,
                        offset=echo_len + sum(len(t) for t in gen.tokens[:sent]), first=sent)
                tok_mid = mid.replace(b'"logprobs":null', b'"logprobs":' + dumps(lp))
            sent += 1
            last = sent == n
            fr = b'"%s"' % finish.encode() if last else b"null"
            reason = gen.stop_reason if (last and finish == "stop") else None
            extra = (b',"stop_reason":' + json.dumps(reason).encode()) if (last and chat) else b""
            tail = post
            if reason is not None and not chat:
                tail = post.replace(b'"stop_reason":null', b'"stop_reason":'
                                    + json.dumps(reason).encode(), 1)
            await resp.chunk(pre + tok.encode() + tok_mid + fr + extra + tail)
            chunks += 1
            deadline += interval
        if finish == "abort" or n == 0:
            # vLLM ends an aborted (or empty) choice with one chunk carrying the reason.
            extra = b',"stop_reason":null' if chat else b""
            await resp.chunk(pre + b'""' + mid + b'"%s"' % finish.encode() + extra + post)
        sent_total += sent
        finishes.append(finish)
    if include_usage:
        await resp.chunk(b"data: " + head + b',"choices":[],"usage":'
                         + dumps(usage_obj(ptoks, sent_total, full=False))
                         + b',"system_fingerprint":"' + FINGERPRINT.encode() + b'"}\n\n')
    await resp.chunk(b"data: [DONE]\n\n")
    await resp.end_stream()
    return sent_total, finishes


async def embeddings(srv: SimServer, req: Request, resp: Responder) -> None:
    if not srv.opts.embedding:
        raise NOT_FOUND
    body = parse_body(req)
    model = _check_model(srv, body)
    inp = body.get("input")
    texts: list[str]
    if isinstance(inp, str):
        texts = [inp]
    elif isinstance(inp, list) and inp and all(isinstance(t, str) for t in inp):
        texts = [str(t) for t in inp]
    else:
        raise SimHttpError(400, {"error": {"message": "input must be a string or a list of "
                                           "strings", "type": "BadRequestError",
                                           "param": "input", "code": 400}})
    handle = await srv.engine.admit(resp.client_gone)
    if handle is None:
        resp.close_after = True
        return
    try:
        await srv.engine.pace(handle, asyncio.get_running_loop().time()
                              + srv.engine.timing.first_token_s())
        ptoks = sum(max(1, textgen.count_tokens(t)) for t in texts)
        data = [{"index": i, "object": "embedding",
                 "embedding": textgen.embedding(model, t, srv.opts.embedding_dims)}
                for i, t in enumerate(texts)]
        await resp.send_json(200, {
            "id": f"embd-{secrets.token_hex(8)}", "object": "list",
            "created": int(time.time()), "model": model, "data": data,
            "usage": {"prompt_tokens": ptoks, "total_tokens": ptoks, "completion_tokens": 0,
                      "prompt_tokens_details": None},
        })
        srv.metrics.prompt_tokens += ptoks
    finally:
        srv.engine.release(handle)
    srv.request_done()


async def tokenize(srv: SimServer, req: Request, resp: Responder) -> None:
    body = parse_body(req)
    _check_model(srv, body)
    if "messages" in body and isinstance(body["messages"], list):
        text = textgen.chat_prompt_text(body["messages"])
    else:
        text = str(body.get("prompt", ""))
    n = textgen.count_tokens(text)
    await resp.send_json(200, {"count": n, "max_model_len": srv.opts.max_model_len,
                               "tokens": list(range(n)), "token_strs": None})
