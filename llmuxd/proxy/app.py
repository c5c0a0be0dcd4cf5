"""The OpenAI-compatible front end: a Falcon WSGI app run by gunicorn (gthread).

One request: bounded body read → JSON → ``model`` → lease from llmuxd (which may
wait for a switch) → forward to the child → stream the answer back as it comes →
release the lease with the outcome when the body ends, fails or the client goes
away. The daemon resolves aliases and answers ``model_not_found``, so the front
end never disagrees with it after a config reload.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import falcon
import structlog

from llmuxd.config import Config, load_config
from llmuxd.proxy import errors, logs
from llmuxd.proxy.errors import OpenAIError
from llmuxd.proxy.forward import (
    HOP_BY_HOP,
    Outcome,
    ProxiedBody,
    UpstreamError,
    UpstreamPool,
    open_upstream,
    response_headers,
)
from llmuxd.proxy.lease_client import (
    ClientGone,
    DaemonError,
    DaemonUnavailable,
    Lease,
    LeaseClient,
)

log = structlog.get_logger("llmux.proxy")

# POST /v1/<route>: API routes only; vLLM's dev endpoints (/sleep, /wake_up,
# /collective_rpc, ...) live outside /v1 and are never reachable from here.
_ROUTE_RE = re.compile(r"[a-z0-9_\-]+(/[a-z0-9_\-]+)*")
_DENIED_ROUTES = frozenset({"load_lora_adapter", "unload_lora_adapter"})
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Request headers the child must not see from the client.
# The body is sent at once, so "Expect: 100-continue" is not passed on either.
_DROP_TO_UPSTREAM = HOP_BY_HOP | {"host", "content-length", "x-request-id", "expect"}


@dataclass
class Deps:
    """What the app needs from outside; tests pass their own."""

    config: Config
    leases: LeaseClient
    pool: UpstreamPool
    request_log: Any = field(default_factory=logs.request_logger)


def create_app(deps: Deps) -> falcon.App:
    """Build the Falcon app around its dependencies (Falcon's factory idiom)."""
    app = falcon.App(middleware=[RequestContext(deps)], cors_enable=False)
    app.req_options.strip_url_path_trailing_slash = True
    app.add_route("/v1/models", ModelsResource(deps))
    app.add_route("/v1/models/{model_id}", ModelResource(deps))
    app.add_route("/v1/{route:path}", ProxyResource(deps))
    app.add_route("/health", HealthResource(deps))
    app.add_error_handler(Exception, errors.handle_error)
    app.add_error_handler(falcon.HTTPError, errors.handle_error)
    return app


def get_app() -> falcon.App:
    """The app for gunicorn, configured from env LLMUX_CONFIG and LLMUX_SOCKET."""
    logs.configure()
    config_path = os.environ.get("LLMUX_CONFIG", "/etc/llmux.toml")
    config = load_config(config_path)
    socket_path = os.environ.get("LLMUX_SOCKET") or config.daemon.socket
    return create_app(make_deps(config, socket_path))


def make_deps(config: Config, socket_path: str) -> Deps:
    # The daemon answers a lease within request_timeout_secs (504 after); the margin
    # keeps our socket timeout from firing first.
    leases = LeaseClient(socket_path, lease_timeout=config.policy.request_timeout_secs + 30.0)
    return Deps(config=config, leases=leases,
                pool=UpstreamPool(timeout=config.proxy.upstream_timeout_secs))


# ---------------------------------------------------------------------------
# Middleware: request id, API keys, the canonical log line


class RequestContext:
    """Request id in and out, Bearer keys on /v1, one log line per request."""

    def __init__(self, deps: Deps) -> None:
        self.keys = frozenset(deps.config.proxy.api_keys)
        self.log = deps.request_log

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        ctx = req.context
        ctx.started = time.monotonic()
        given = req.get_header("X-Request-Id")
        ctx.request_id = given if given and _REQUEST_ID_RE.fullmatch(given) else os.urandom(
            12).hex()
        ctx.deferred = False
        resp.set_header("X-Request-Id", ctx.request_id)
        if self.keys and req.path.startswith("/v1"):
            auth = req.get_header("Authorization") or ""
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or key.strip() not in self.keys:
                raise OpenAIError(401, "invalid or missing API key (Authorization: Bearer)",
                                  "authentication_error", "invalid_api_key")

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         req_succeeded: bool) -> None:
        ctx = req.context
        if "request_id" not in ctx:
            return
        resp.set_header("X-Request-Id", ctx.request_id)
        if ctx.deferred:
            return  # the stream's close() writes the line with the final numbers
        self.log.info("request", request_id=ctx.request_id, method=req.method,
                      path=req.path, model=ctx.get("model"), status=resp.status_code,
                      error=ctx.get("error_code"), waited_ms=ctx.get("waited_ms"),
                      switched=ctx.get("switched"),
                      duration_ms=round((time.monotonic() - ctx.started) * 1000.0, 3))


# ---------------------------------------------------------------------------
# Resources


class ProxyResource:
    """POST /v1/<route> with a JSON body naming a model: lease, forward, stream."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.max_body = deps.config.proxy.max_body_bytes
        self.strip_auth = bool(deps.config.proxy.api_keys)
        self.log = deps.request_log

    def on_post(self, req: falcon.Request, resp: falcon.Response, route: str) -> None:
        if not _ROUTE_RE.fullmatch(route) or route in _DENIED_ROUTES:
            raise OpenAIError(404, f"no such route: POST /v1/{route}", "invalid_request_error",
                              "not_found")
        body = self._read_body(req)
        data = _parse(body)
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise errors.bad_request("you must provide a model parameter", "model")
        ctx = req.context
        ctx.model = model
        asked = time.monotonic()
        lease = self._lease(model, req.env.get("gunicorn.socket"))
        lease_ms = round((time.monotonic() - asked) * 1000.0, 3)
        ctx.waited_ms = lease.waited_ms
        ctx.switched = lease.switched
        if lease.served_model_name != model:
            data["model"] = lease.served_model_name
            body = json.dumps(data).encode()
        path = "/v1/" + route
        if req.query_string:
            path += "?" + req.query_string
        started = time.monotonic()
        try:
            conn, head = open_upstream(self.deps.pool, lease.host, lease.port, "POST", path,
                                     body, self._upstream_headers(req, len(body)))
        except UpstreamError as exc:
            # Released with the answer awaited: when the daemon revoked the lease (it
            # killed a hung child, or stopped the model), the client learns why.
            why = self._release_why(lease, Outcome(
                status=502, error=str(exc), duration_ms=(time.monotonic() - started) * 1e3))
            raise errors.upstream_failed(f"{exc} ({why})" if why else str(exc)) from None
        try:
            resp.status = head.status
            for name, value in response_headers(head):
                resp.append_header(name, value)
        except Exception:
            conn.close()
            self._release(lease, Outcome(status=502, error="bad response head from the child"))
            raise
        outcome = Outcome(status=head.status)
        ctx.deferred = True
        request_id = ctx.request_id

        def on_close(result: Outcome) -> None:
            self._release(lease, result)
            self.log.info("request", request_id=request_id, method="POST", path=req.path,
                          model=model, served_model=lease.served_model_name,
                          status=result.status, error=result.error,
                          waited_ms=lease.waited_ms, lease_ms=lease_ms,
                          switched=lease.switched,
                          bytes=result.bytes, ttfb_ms=result.ttfb_ms,
                          upstream_ms=round(result.duration_ms, 3),
                          duration_ms=round((time.monotonic() - ctx.started) * 1000.0, 3))

        resp.stream = ProxiedBody(self.deps.pool, lease.host, lease.port, conn, head, started,
                                  outcome, on_close, req.env.get("gunicorn.socket"))

    def _read_body(self, req: falcon.Request) -> bytes:
        length = req.content_length
        if length is not None and length > self.max_body:
            raise OpenAIError(413, f"request body of {length} bytes is over the limit of "
                              f"{self.max_body} bytes", "invalid_request_error",
                              "request_too_large")
        body: bytes = req.bounded_stream.read(self.max_body + 1)
        if len(body) > self.max_body:
            raise OpenAIError(413, f"request body is over the limit of {self.max_body} bytes",
                              "invalid_request_error", "request_too_large")
        return body

    def _lease(self, model: str, client: Any) -> Lease:
        try:
            return self.deps.leases.acquire(model, client)
        except ClientGone:
            # Nobody is left to read an answer; 499 (nginx's "client closed request")
            # names it in the log line.
            raise OpenAIError(499, "client closed the connection while waiting for "
                              f"model '{model}'", "invalid_request_error",
                              "client_closed") from None
        except DaemonError as exc:
            raise errors.from_daemon(exc.code, exc.message) from None
        except DaemonUnavailable as exc:
            raise errors.daemon_unavailable(str(exc)) from None

    def _release(self, lease: Lease, outcome: Outcome) -> None:
        try:
            self.deps.leases.release(lease.lease_id, outcome.release_body())
        except (DaemonError, DaemonUnavailable) as exc:
            # The daemon reclaims leases of dead peers; a lost release is logged only.
            log.warning("release_failed", lease_id=lease.lease_id, error=str(exc))

    def _release_why(self, lease: Lease, outcome: Outcome) -> str:
        """Release and wait for the answer; why the lease was revoked ("" if it was not)."""
        try:
            answer = self.deps.leases.release_now(lease.lease_id, outcome.release_body())
        except (DaemonError, DaemonUnavailable) as exc:
            log.warning("release_failed", lease_id=lease.lease_id, error=str(exc))
            return ""
        revoked = answer.get("revoked")
        return f"lease revoked: {revoked}" if isinstance(revoked, str) and revoked else ""

    def _upstream_headers(self, req: falcon.Request, length: int) -> dict[str, str]:
        headers: dict[str, str] = {}
        for key, value in req.env.items():
            if key.startswith("HTTP_"):
                name = key[5:].replace("_", "-").lower()
                if name in _DROP_TO_UPSTREAM or (self.strip_auth and name == "authorization"):
                    continue
                headers[name] = value
        headers["content-type"] = "application/json"
        headers["content-length"] = str(length)
        headers["x-request-id"] = req.context.request_id
        if req.remote_addr:
            earlier = headers.get("x-forwarded-for")
            headers["x-forwarded-for"] = (f"{earlier}, {req.remote_addr}" if earlier
                                          else req.remote_addr)
        return headers


def _parse(body: bytes) -> dict[str, Any]:
    if not body:
        raise errors.bad_request("the request body is empty; expected a JSON object")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise errors.bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise errors.bad_request("the request body must be a JSON object")
    return data


class ModelsResource:
    """GET /v1/models: configured models and aliases, with llmux's state."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"object": "list", "data": model_list(self.deps)}


class ModelResource:
    """GET /v1/models/{id}: one model or alias, 404 ``model_not_found`` otherwise."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        for entry in model_list(self.deps):
            if entry["id"] == model_id:
                resp.media = entry
                return
        raise OpenAIError(404, f"The model '{model_id}' does not exist",
                          "invalid_request_error", "model_not_found", "model")


def model_list(deps: Deps) -> list[dict[str, Any]]:
    """Models from the daemon's status (the truth after a reload), else from config."""
    try:
        status = deps.leases.status()
        models: dict[str, Any] = status.get("models") or {}
    except (DaemonError, DaemonUnavailable):
        models = {name: {"name": name, "state": "unknown", "aliases": list(m.aliases)}
                  for name, m in deps.config.models.items()}
    created = int(time.time())
    out: list[dict[str, Any]] = []
    for name, st in models.items():
        configured = deps.config.models.get(name)
        info = {"state": st.get("state"), "sleep_level": st.get("sleep_level"),
                "alias_of": None, "in_flight": st.get("in_flight"),
                "queued": st.get("queued")}
        entry = {"id": name, "object": "model", "created": int(st.get("state_since") or created),
                 "owned_by": "llmux", "root": configured.model_path if configured else name,
                 "parent": None, "llmux": info}
        out.append(entry)
        for alias in st.get("aliases") or ():
            out.append({**entry, "id": alias, "llmux": {**info, "alias_of": name}})
    return out


class HealthResource:
    """GET /health: 200 only when the daemon answers on its socket."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            daemon = self.deps.leases.health()
        except (DaemonError, DaemonUnavailable) as exc:
            raise errors.daemon_unavailable(str(exc)) from None
        resp.media = {"status": "ok", "daemon": daemon}
