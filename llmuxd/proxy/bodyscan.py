"""Find a request's ``model`` without building the body's object tree.

Why: the front end needs one field of the body, and forwards the body itself.
``json.loads`` of a 16 MiB body of small objects builds ~20 Python objects per
object in it (300-400 MB); three such requests took a worker to 930 MB. So:

* A small body (up to SMALL bytes) is parsed with ``json.loads``: cheap at that size,
  and it gives exact errors for malformed JSON.
* A larger one is scanned: a C-speed regex skips strings and everything but
  brackets, so Python only runs once per bracket, tracking depth; the ``model`` key
  is looked for only in the top-level object's own text. Memory: the body, and no
  tree (tests/proxy/test_limits.py measures it through a real worker). The body's
  JSON is not fully validated then: the child does that and answers 400 itself.

Either way the original bytes are forwarded unchanged, unless an alias must be
rewritten to the served name: then only the value's span is replaced.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

SMALL = 64 << 10

# Everything up to the next bracket, strings (with escapes) consumed whole.
_TO_BRACKET = re.compile(rb'[^"\[\]{}]*(?:"[^"\\]*(?:\\.[^"\\]*)*"[^"\[\]{}]*)*', re.DOTALL)
# A "model" key and its string value, at the start of the text or after { or ,.
_MODEL = re.compile(rb'(?:^|[{,])\s*"model"\s*:\s*("[^"\\]*(?:\\.[^"\\]*)*")', re.DOTALL)
_MODEL_ANY = re.compile(rb'(?:^|[{,])\s*"model"\s*:', re.DOTALL)
_WS = b" \t\r\n"


class BodyError(ValueError):
    """The body cannot carry a model: not JSON, not an object, no string model."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Found:
    """The model named by the body, and where its JSON string sits (for a rewrite)."""

    model: str
    start: int
    end: int


def find_model(body: bytes) -> Found:
    """The body's top-level ``model`` (BodyError when there is none or it is bad)."""
    if not body.strip(_WS):
        raise BodyError("the request body is empty; expected a JSON object")
    if len(body) <= SMALL:
        return _small(body)
    return _scan(body)


def rewrite(body: bytes, found: Found, model: str) -> bytes:
    """``body`` with the model's value replaced by ``model`` (nothing else touched)."""
    if found.start < 0:  # a small body: where the value sits is found only when needed
        found = _scan(body)
    return body[:found.start] + json.dumps(model).encode() + body[found.end:]


def _small(body: bytes) -> Found:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise BodyError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BodyError("the request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BodyError("you must provide a model parameter", "model")
    # The span is looked up by rewrite() only if an alias must be rewritten (the scan
    # keeps the last of duplicate keys, as json.loads does).
    return Found(model, -1, -1)


def _scan(body: bytes) -> Found:
    start = 0
    end = len(body)
    while start < end and body[start] in _WS:
        start += 1
    if body[start:start + 1] != b"{":
        raise BodyError("the request body must be a JSON object")
    depth = 0
    pos = start
    top_from = start  # where the current stretch of top-level text began
    last: Found | None = None
    while True:
        m = _TO_BRACKET.match(body, pos)
        assert m is not None
        stop = m.end()
        if stop >= end or body[stop] == 0x22:  # the end, or a string left open
            raise BodyError("the request body is not valid JSON: it ends inside a value")
        if body[stop] in b"[{":
            if depth == 0:
                top_from = stop
            elif depth == 1:
                last = _look(body, top_from, stop, last)
            depth += 1
        else:
            depth -= 1
            if depth < 0:
                raise BodyError("the request body is not valid JSON: unbalanced brackets")
            if depth == 1:
                top_from = stop + 1
            elif depth == 0:
                last = _look(body, top_from, stop, last)
                if body[stop + 1:].strip(_WS):
                    raise BodyError("the request body is not valid JSON: extra data "
                                    "after the object")
                break
        pos = stop + 1
    if last is None:
        raise BodyError("you must provide a model parameter", "model")
    return last


def _look(body: bytes, lo: int, hi: int, last: Found | None) -> Found | None:
    """Look for ``"model": "<string>"`` in the top-level text body[lo:hi]."""
    segment = body[lo:hi]
    for m in _MODEL_ANY.finditer(segment):
        value = _MODEL.match(segment, m.start())
        if value is None:
            raise BodyError("the model parameter must be a string", "model")
        try:
            model = json.loads(value.group(1))
        except ValueError:
            raise BodyError("the model parameter is not a valid JSON string",
                            "model") from None
        if not model:
            raise BodyError("you must provide a model parameter", "model")
        last = Found(model, lo + value.start(1), lo + value.end(1))
    return last
