"""Deterministic fake text, token counts and embeddings.

Text depends only on (served model name, prompt, seed) at temperature 0 or with a
seed, so tests can assert "same request, same answer" and "different model,
different answer" the way they would against real vLLM with greedy decoding. A
token is one word here; counts are what usage reports.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
from dataclasses import dataclass

_WORDS_TEXT = (
    "the of and to in is that it was for on are as with his they at be this from have "
    "or by one had not but what all were when we there can an your which their said if "
    "do will each about how up out them then she many some so these would other into "
    "has more her two like him see time could no make than first been its who now "
    "people my made over did down only way find use may water long little very after "
    "words called just where most know get through back much before go good new write "
    "our used me man too any day same right look think also around another came come "
    "work three word must because does part even place well such here take why things "
    "help put years different away again off went old number great tell men say small "
    "every found still between name should home big give air line set own under read "
    "last never us left end along while might next sound below saw something thought "
    "both few those always looked show large often together asked house world going "
    "want school important until form food keep children feet land side without boy "
    "once animals life enough took sometimes four head above kind began almost live "
    "page got earth need far hand high year mother light parts country father let "
    "night following picture being study second eyes soon times story boys since white "
    "days ever paper hard near sentence better best across during today others however "
    "sure means knew together try told young miles sun ways thing whole hear example "
    "heard several change answer room sea against top turned learn point city play"
)
WORDS = tuple(_WORDS_TEXT.split())

GARBAGE_TOKEN = "!"
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """Rough token count: words and punctuation marks."""
    return len(_TOKEN_RE.findall(text))


def tokens_of(text: str) -> list[str]:
    """The tokens count_tokens counts."""
    return _TOKEN_RE.findall(text)


def chat_prompt_text(messages: list[dict[str, object]]) -> str:
    """Flatten chat messages the way a chat template would (for hashing and counting)."""
    parts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts
            content = " ".join(
                str(p.get("text", "")) for p in content if isinstance(p, dict)
            )
        parts.append(f"<|{m.get('role', 'user')}|>\n{content or ''}<|end|>\n")
    return "".join(parts) + "<|assistant|>\n"


def chat_prompt_tokens(messages: list[dict[str, object]]) -> int:
    """Tokens of the templated chat prompt: content plus a few per message."""
    total = 1
    for m in messages:
        content = m.get("content")
        text = content if isinstance(content, str) else chat_prompt_text([m])
        total += count_tokens(str(text)) + 4
    return total


@dataclass
class Generation:
    """The planned output of one request: its tokens and why it ends."""

    tokens: list[str]
    finish_reason: str  # "stop" | "length"
    stop_reason: str | None = None  # the stop string that ended it


def plan(
    model: str,
    prompt: str,
    *,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    chat: bool,
    garbage: bool,
    ignore_eos: bool = False,
    choice: int = 0,
    min_tokens: int = 0,
) -> Generation:
    """Decide a request's whole output up front (cheap, and deterministic when asked).

    ``choice``: which of the request's ``n`` samples (greedy ones are all the same;
    seeded ones differ from each other but repeat from request to request).
    """
    if seed is None and temperature > 0:
        rng = random.Random(os.urandom(16))
    else:
        nth = f"\0{choice}" if (choice and temperature > 0) else ""
        digest = hashlib.sha256(f"{model}\0{prompt}\0{seed}{nth}".encode()).digest()
        rng = random.Random(digest)
    natural = max_tokens if ignore_eos else rng.randint(12, 80)  # vLLM's ignore_eos
    natural = max(natural, min(min_tokens, max_tokens))
    n = min(natural, max_tokens)
    finish = "length" if (ignore_eos or max_tokens < natural) else "stop"
    if garbage:
        return Generation([GARBAGE_TOKEN] * n, finish)
    tokens: list[str] = []
    start_sentence = True
    for i in range(n):
        w = WORDS[rng.randrange(len(WORDS))]
        if start_sentence:
            w = w.capitalize()
            start_sentence = False
        tok = w if (chat and i == 0) else " " + w
        if rng.random() < 0.1 and i < n - 1:
            tok += "."
            start_sentence = True
        tokens.append(tok)
    if tokens and finish == "stop":
        tokens[-1] += "."
    return Generation(tokens, finish)


def embedding(model: str, text: str, dims: int = 256) -> list[float]:
    """A deterministic unit vector for (model, text)."""
    digest = hashlib.sha256(f"{model}\0{text}".encode()).digest()
    rng = random.Random(digest)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]
