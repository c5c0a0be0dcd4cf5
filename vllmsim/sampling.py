"""The sampling fields of a completion or chat request, as real vLLM honours them.

Found by diffing request fields against real vLLM 0.32 (tests/conformance): `n`,
`logprobs` (completions: top-k per token; chat: `logprobs` + `top_logprobs`),
`prompt_logprobs`, `echo`, `stop` + `include_stop_str_in_output`, `min_tokens`,
`top_k` / `top_p` / `min_p` (the settings that make sampling greedy), and
`return_token_ids`. Before, the simulator silently dropped them: one choice, no
logprobs, stop strings ignored. The numbers are fake but deterministic, in the
shapes and relations vLLM's are (chosen token ranked first when greedy, logprobs
<= 0, one entry per token, prompt logprobs starting with null).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from vllmsim import textgen
from vllmsim.errors import bad_request, validation_error

if TYPE_CHECKING:
    from vllmsim.textgen import Generation

MAX_LOGPROBS = 20   # vLLM's default --max-logprobs
VOCAB = 32000


@dataclass(frozen=True)
class Sampling:
    """What a request asks of sampling beyond temperature and seed."""

    greedy: bool = False
    n: int = 1
    logprobs: int | None = None          # top entries per output token; None: no logprobs
    prompt_logprobs: int | None = None
    echo: bool = False
    stop: tuple[str, ...] = ()
    include_stop: bool = False
    min_tokens: int = 0
    token_ids: bool = False


def _int(body: dict[str, object], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise validation_error("int_type", f"body.{key}", "Input should be a valid integer", v)
    try:
        f = float(v)
    except ValueError:
        raise validation_error(
            "int_parsing", f"body.{key}",
            "Input should be a valid integer, unable to parse string as an integer", v,
        ) from None
    if f != int(f):
        raise validation_error("int_from_float", f"body.{key}",
                               "Input should be a valid integer, got a number with a "
                               "fractional part", v)
    return int(f)


def _float(body: dict[str, object], key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise validation_error("float_type", f"body.{key}", "Input should be a valid number", v)
    try:
        return float(v)
    except ValueError:
        raise validation_error(
            "float_parsing", f"body.{key}",
            "Input should be a valid number, unable to parse string as a number", v,
        ) from None


def _stops(body: dict[str, object]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,) if v else ()
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(s for s in v if s)
    raise validation_error("string_type", "body.stop", "Input should be a valid string", v)


def parse(body: dict[str, object], *, chat: bool, stream: bool) -> Sampling:
    """The request's sampling fields, or the 400 vLLM answers for a bad one."""
    n = _int(body, "n")
    if n is not None and n < 1:
        raise bad_request(f"n must be at least 1, got {n}.", "n")
    top_k = _int(body, "top_k")
    if top_k is not None and top_k < -1:
        raise bad_request(f"top_k must be 0 (disable), or at least 1, got {top_k}.", "top_k")
    top_p = _float(body, "top_p")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise bad_request(f"top_p must be in (0, 1], got {top_p}.", "top_p")
    min_p = _float(body, "min_p")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise bad_request(f"min_p must be in [0, 1], got {min_p}.", "min_p")
    min_tokens = _int(body, "min_tokens") or 0
    if min_tokens < 0:
        raise bad_request(f"min_tokens must be greater than or equal to 0, got {min_tokens}.",
                          "min_tokens")
    logprobs: int | None
    if chat:
        top = _int(body, "top_logprobs")
        wants = body.get("logprobs") is True
        if top is not None and top < 0:
            raise validation_error("value_error", "body", "Value error, `top_logprobs` must be "
                                   "a positive value.", body)
        if top and not wants:
            raise validation_error("value_error", "body", "Value error, when using "
                                   "`top_logprobs`, `logprobs` must be set to true.", body)
        logprobs = (top or 0) if wants else None
    else:
        logprobs = _int(body, "logprobs")
        if logprobs is not None and logprobs < 0:
            raise validation_error("value_error", "body", "Value error, `logprobs` must be "
                                   "a positive value.", body)
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise bad_request(f"Requested sample logprobs of {logprobs}, which is greater than "
                          f"max allowed: {MAX_LOGPROBS}", "logprobs")
    prompt_lp = _int(body, "prompt_logprobs")
    if prompt_lp is not None:
        if stream:
            raise validation_error("value_error", "body", "Value error, `prompt_logprobs` "
                                   "are not available when `stream=True`.", body)
        if prompt_lp < 0:
            raise bad_request(f"prompt_logprobs must be non-negative, got {prompt_lp}.",
                              "prompt_logprobs")
        if prompt_lp > MAX_LOGPROBS:
            raise bad_request(f"Requested prompt logprobs of {prompt_lp}, which is greater "
                              f"than max allowed: {MAX_LOGPROBS}", "prompt_logprobs")
    greedy = top_k == 1 or (top_p is not None and top_p < 1e-6) or min_p == 1.0
    return Sampling(
        greedy=greedy, n=n or 1, logprobs=logprobs, prompt_logprobs=prompt_lp,
        echo=(not chat and body.get("echo") is True), stop=_stops(body),
        include_stop=body.get("include_stop_str_in_output") is True, min_tokens=min_tokens,
        token_ids=body.get("return_token_ids") is True,
    )


def apply_stop(gen: Generation, stops: tuple[str, ...], include: bool) -> Generation:
    """End ``gen`` at the first stop string, as vLLM does (finish "stop", stop_reason).

    The token that completes the stop string still counts as generated; its text is
    cut there (or kept through the stop string with include_stop_str_in_output).
    """
    if not stops:
        return gen
    full = "".join(gen.tokens)
    hits = [(i, s) for s in stops if (i := full.find(s)) >= 0]
    if not hits:
        return gen
    at, stop = min(hits)
    end = at + len(stop) if include else at
    last_needed = at + len(stop)      # the text up to here was generated
    tokens: list[str] = []
    pos = 0
    for tok in gen.tokens:
        start = pos
        pos += len(tok)
        tokens.append(tok[:max(0, end - start)] if pos > end else tok)
        if pos >= last_needed:
            break
    return replace(gen, tokens=tokens, finish_reason="stop", stop_reason=stop)


# -- fake numbers in vLLM's shapes -------------------------------------------------------


def token_id(token: str) -> int:
    return int.from_bytes(hashlib.sha256(token.encode()).digest()[:4], "big") % VOCAB


def _rng(*parts: object) -> random.Random:
    return random.Random(hashlib.sha256("\0".join(map(str, parts)).encode()).digest())


def _alternatives(rng: random.Random, token: str, k: int) -> list[str]:
    """k plausible other tokens (same leading-space style as ``token``), all distinct."""
    space = " " if token.startswith(" ") else ""
    out: list[str] = []
    while len(out) < k:
        w = space + textgen.WORDS[rng.randrange(len(textgen.WORDS))]
        if w != token and w not in out:
            out.append(w)
    return out


def step(model: str, context: str, i: int, token: str, k: int, greedy: bool
         ) -> tuple[float, list[tuple[str, float]]]:
    """The chosen token's logprob and the k most likely tokens (descending)."""
    rng = _rng(model, context, i, token)
    values = sorted((-rng.uniform(0.01, 6.0) for _ in range(k + 1)), reverse=True)
    if greedy:
        chosen = values[0]
        top = [(token, chosen), *zip(_alternatives(rng, token, k - 1), values[1:k],
                                     strict=True)] if k else []
    else:
        chosen = values[0] - rng.uniform(0.0, 2.0)
        top = list(zip(_alternatives(rng, token, k), values[:k], strict=True))
    return chosen, top


def completion_logprobs(model: str, context: str, tokens: list[str], k: int, greedy: bool,
                        offset: int = 0, first: int = 0) -> dict[str, object]:
    """A completions choice's ``logprobs`` (CompletionLogProbs)."""
    text_offset, token_lps, tops = [], [], []
    pos = offset
    for i, tok in enumerate(tokens, start=first):
        chosen, top = step(model, context, i, tok, k, greedy)
        entry = dict(top)
        entry[tok] = chosen
        text_offset.append(pos)
        token_lps.append(chosen)
        tops.append(entry)
        pos += len(tok)
    return {"text_offset": text_offset, "token_logprobs": token_lps, "tokens": list(tokens),
            "top_logprobs": tops}


def chat_logprob_entries(model: str, context: str, tokens: list[str], k: int, greedy: bool,
                         first: int = 0) -> list[dict[str, object]]:
    """``logprobs.content`` entries of a chat choice (ChatCompletionLogProb)."""
    out = []
    for i, tok in enumerate(tokens, start=first):
        chosen, top = step(model, context, i, tok, k, greedy)
        out.append({"token": tok, "logprob": chosen, "bytes": list(tok.encode()),
                    "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                     for t, v in top]})
    return out


def prompt_tokens(text: str, count: int) -> list[str]:
    """``count`` prompt tokens for ``text`` (the sim's token count is an estimate)."""
    toks = textgen.tokens_of(text)[:count]
    while len(toks) < count:
        toks.append("<|end|>")
    return toks


def prompt_logprobs(model: str, text: str, count: int, k: int) -> list[object]:
    """vLLM's ``prompt_logprobs``: null, then {token_id: {logprob, rank, decoded_token}}."""
    toks = prompt_tokens(text, count)
    out: list[object] = [None] if toks else []
    for i, tok in enumerate(toks[1:], start=1):
        rng = _rng(model, text, "prompt", i)
        rank = 1 if rng.random() < 0.3 else rng.randint(2, 50)
        values = sorted((-rng.uniform(0.01, 6.0) for _ in range(k + 1)), reverse=True)
        entry: dict[str, dict[str, object]] = {}
        for r, (alt, v) in enumerate(zip(_alternatives(rng, tok, k), values, strict=False),
                                     start=1):
            entry[str(token_id(alt))] = {"logprob": v, "rank": r, "decoded_token": alt}
        if rank == 1 and k:
            entry.pop(next(iter(entry)))
            mine = {"logprob": values[0], "rank": 1, "decoded_token": tok}
            entry = {str(token_id(tok)): mine, **entry}
        else:
            entry[str(token_id(tok))] = {"logprob": values[-1] - rng.uniform(0, 2),
                                         "rank": rank, "decoded_token": tok}
        out.append(entry)
    return out
