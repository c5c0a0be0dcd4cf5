"""OpenAI-shaped errors: every failure of the front end leaves in one JSON shape.

Clients of an OpenAI-compatible server (the ``openai`` SDK, LangChain, curl
scripts) parse ``{"error": {"message", "type", "param", "code"}}``; an HTML page or
a traceback breaks them and leaks internals. So there is exactly one error type,
one table mapping the daemon's lease error codes onto it, and one Falcon handler
that renders anything raised (ours, Falcon's, or a bug) in that shape.
"""

from __future__ import annotations

import json
from typing import Any

import falcon
import structlog

log = structlog.get_logger("llmux.proxy")


class OpenAIError(Exception):
    """A failure a client should see, with its HTTP status and OpenAI fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    """The JSON bytes of one OpenAI error (also used inside SSE streams)."""
    return json.dumps({"error": {"message": message, "type": type_, "param": param,
                                 "code": code}}).encode()


def sse_event(body: bytes) -> bytes:
    """An error body as the SSE event that ends a broken stream (the connection is cut
    after it, so the answer does not read as complete)."""
    return b"data: " + body + b"\n\n"


# The daemon's control-API codes (docs/interfaces.md §5) as the client sees them.
DAEMON_CODES: dict[str, tuple[int, str]] = {
    "bad_request": (400, "invalid_request_error"),
    "model_not_found": (404, "invalid_request_error"),
    "queue_full": (429, "rate_limit_error"),
    "model_failed": (503, "service_unavailable_error"),
    "shutting_down": (503, "service_unavailable_error"),
    "timeout": (504, "timeout_error"),
}


def from_daemon(code: str, message: str) -> OpenAIError:
    """Map a lease refusal from llmuxd to the client's error (unknown codes → 502)."""
    status, type_ = DAEMON_CODES.get(code, (502, "upstream_error"))
    param = "model" if code == "model_not_found" else None
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return OpenAIError(status, message, type_, code, param, headers)


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", "invalid_request", param)


def daemon_unavailable(detail: str) -> OpenAIError:
    return OpenAIError(503, f"llmux daemon unavailable: {detail}",
                       "service_unavailable_error", "daemon_unavailable",
                       headers={"Retry-After": "1"})


def frontend_stopping() -> OpenAIError:
    """The worker is stopping (a reload, a restart, llmuxd stopping) and ends what is
    still running: the request may be retried at once (another worker, or the next)."""
    return OpenAIError(503, "llmux's front end is restarting and ended this request; "
                       "retry it", "service_unavailable_error", "frontend_stopping",
                       headers={"Retry-After": "1"})


def upstream_failed(detail: str) -> OpenAIError:
    return OpenAIError(502, f"model server failed: {detail}", "upstream_error",
                       "upstream_error")


# Falcon's own errors (unknown route, wrong method, bad header ...) by status.
_FALCON_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    411: ("invalid_request_error", "length_required"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
}


def as_openai(ex: Exception, method: str, path: str, request_id: str | None) -> OpenAIError:
    """Any exception as the OpenAI error a client sees; a bug becomes a plain 500 (logged)."""
    if isinstance(ex, OpenAIError):
        return ex
    if isinstance(ex, falcon.HTTPError):
        status = ex.status_code
        type_, code = _FALCON_TYPES.get(status, ("invalid_request_error", "http_error"))
        message = ex.description or ex.title or "error"
        if status == 404:
            message = f"no such route: {method} {path}"
        elif status == 405:
            message = f"method {method} not allowed on {path}"
        err = OpenAIError(status, message, type_, code)
        ex_headers: Any = ex.headers or {}
        items = ex_headers.items() if isinstance(ex_headers, dict) else ex_headers
        for name, value in items:
            err.headers[str(name)] = str(value)
        return err
    log.exception("internal_error", path=path, request_id=request_id)
    return OpenAIError(500, "internal error in the llmux front end", "server_error",
                       "internal")


def handle_error(req: falcon.Request, resp: falcon.Response, ex: Exception,
                 params: dict[str, Any]) -> None:
    """Render any exception as an OpenAI error; a bug becomes a plain 500."""
    err = as_openai(ex, req.method, req.path, req.context.get("request_id"))
    resp.status = err.status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = err.body()
    stream = resp.stream
    resp.stream = None
    if stream is not None and hasattr(stream, "close"):
        stream.close()  # a proxied body releases its lease and upstream connection
    for name, value in err.headers.items():
        resp.set_header(name, value)
    req.context.error_code = err.code


async def handle_error_async(req: Any, resp: Any, ex: Exception, params: dict[str, Any]
                             ) -> None:
    """handle_error for the ASGI app: a proxied stream's close() is awaited."""
    stream = resp.stream
    resp.stream = None
    handle_error(req, resp, ex, params)
    if stream is not None and hasattr(stream, "close"):
        await stream.close()  # a proxied body releases its lease and upstream connection
