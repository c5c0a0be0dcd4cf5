"""The API-key check, one function for both the Falcon app and the proxied fast path.

Deny by default: when keys are set, a request is let through only with
``Authorization: Bearer <one of the keys>``; which routes are open without one is
decided by the callers after routing (llmuxd/proxy/app.py, fastpath.py).
"""

from __future__ import annotations

from llmuxd.proxy.errors import OpenAIError


def bearer_ok(keys: frozenset[str], authorization: str) -> bool:
    """True when the Authorization header's value carries one of ``keys`` as a Bearer token."""
    scheme, _, key = authorization.partition(" ")
    return scheme.lower() == "bearer" and key.strip() in keys


def unauthorized() -> OpenAIError:
    return OpenAIError(401, "invalid or missing API key (Authorization: Bearer)",
                       "authentication_error", "invalid_api_key")
