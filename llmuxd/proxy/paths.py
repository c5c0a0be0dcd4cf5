"""Which request paths the front end accepts at all: only canonical ones.

Why: a router that normalises paths (Falcon drops empty segments; gunicorn and
uvicorn percent-decode ``%2F`` into ``/``) and a check that reads the path string
can disagree about which route a request is for. That disagreement is how
``//v1/chat/completions`` once skipped the API keys. So a path that is not the one
obvious spelling of a route — empty segments, dot segments, an encoded slash or
backslash — is refused with 404 before routing, auth or anything else, and the
router and every check see the same string.
"""

from __future__ import annotations

import re

# POST /v1/<route> that vLLM's OpenAI server answers with a JSON body naming a model
# (vllm/entrypoints/openai/api_server.py and the pooling routers). Everything else
# is 404: vLLM's dev endpoints (/sleep, /wake_up, /collective_rpc, ...) and LoRA
# loading are never reachable from here. Multipart routes (audio) are not proxied.
OPENAI_ROUTES = frozenset({
    "chat/completions", "completions", "embeddings", "responses", "score", "rerank",
    "messages", "classify", "pooling", "tokenize", "detokenize",
})
# %2F (/), %5C (\), %2E (.) in the raw target: never needed by an OpenAI client...
_ENCODED_SEPARATOR = re.compile(rb"%(2f|5c|2e)", re.IGNORECASE)
_ENCODED_DOT_OR_BACKSLASH = re.compile(rb"%(5c|2e)", re.IGNORECASE)
# ...except in a model id, which may contain '/' (``Qwen%2FQwen3-14B``).
_MODEL_IDS = b"/v1/models/"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DOT_SEGMENT = re.compile(r"/\.\.?(/|$)")


def is_canonical(path: str, raw: bytes | None = None) -> bool:
    """True when ``path`` (decoded) and ``raw`` (the target as sent, if known) are canonical.

    Canonical: starts with one ``/``, no empty segment (``//``; one trailing ``/`` is
    allowed, as the router strips it), no ``.`` or ``..`` segment, no backslash or
    control character, and no percent-encoded separator in the raw target (an
    encoded '/' is allowed in a model id under ``/v1/models/``)."""
    if not path.startswith("/") or "//" in path or "\\" in path:
        return False
    if _CONTROL.search(path) or _DOT_SEGMENT.search(path):
        return False
    if raw is None:
        return True
    if raw.startswith(_MODEL_IDS):
        return not _ENCODED_DOT_OR_BACKSLASH.search(raw)
    return not _ENCODED_SEPARATOR.search(raw)


def raw_path(target: bytes) -> bytes:
    """The path part of a request target: ``http://x//v1?a`` → ``//v1``."""
    target = target.split(b"?", 1)[0]
    if target.startswith(b"/"):
        return target
    _scheme, sep, rest = target.partition(b"://")
    if not sep:
        return target
    slash = rest.find(b"/")
    return rest[slash:] if slash >= 0 else b"/"
