"""The OpenAI-compatible front end: a Falcon ASGI app, one event loop per worker.

One request: canonical path → route (an allow-list of vLLM's OpenAI routes) → API
key (deny by default) → bounded body read → ``model`` found without building the
body's tree → lease from llmuxd (which may wait for a switch; a client that leaves
meanwhile leaves the queue) → forward the original bytes to the child over TCP or
a Unix socket → relay the answer as it comes → release the lease with the outcome
when the body ends, fails, or the client goes away. The daemon resolves aliases and
answers ``model_not_found``, so the front end never disagrees with it after a
config reload.

The proxied routes (``POST /v1/<allow-listed route>``, the hot path) are served by
a raw ASGI handler placed in front of the Falcon app (llmuxd/proxy/fastpath.py),
which skips Falcon's per-request objects; everything else is Falcon's.

gunicorn runs it with llmuxd/proxy/worker.py's worker class (uvicorn, uvloop,
httptools), which adds the head/body/write timeouts and the connection limit.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

import falcon
import falcon.asgi
import structlog

from llmuxd.config import Config, load_config
from llmuxd.proxy import auth, errors, logs, paths
from llmuxd.proxy.errors import OpenAIError
from llmuxd.proxy.fastpath import ProxyFastPath
from llmuxd.proxy.lease_client import DaemonError, DaemonUnavailable, LeaseClient, StatusCache
from llmuxd.proxy.upstream import UpstreamClient

log = structlog.get_logger("llmux.proxy")

OPENAI_ROUTES = paths.OPENAI_ROUTES


@dataclass
class Deps:
    """What the app needs from outside; tests pass their own."""

    config: Config
    leases: LeaseClient
    http: UpstreamClient
    status_cache: StatusCache
    request_log: Any = field(default_factory=logs.request_logger)
    parses: asyncio.Semaphore | None = None

    def parse_slots(self) -> asyncio.Semaphore:
        if self.parses is None:
            self.parses = asyncio.Semaphore(self.config.proxy.max_concurrent_body_parses)
        return self.parses


def create_app(deps: Deps) -> ProxyFastPath:
    """Build the app around its dependencies (Falcon's factory idiom): the proxied
    routes' fast path in front of the Falcon app that serves everything else."""
    app = falcon.asgi.App(middleware=[RequestContext(deps)], cors_enable=False)
    app.req_options.strip_url_path_trailing_slash = True
    app.add_route("/v1/models", ModelsResource(deps))
    app.add_route("/v1/models/{rest:path}", ModelResource(deps))
    app.add_route("/v1/{route:path}", ProxyResource(deps))
    app.add_route("/health", HealthResource(deps))
    # Unmatched paths: key check first (an unauthenticated caller learns no routes), then 404.
    app.add_sink(NotFoundSink(deps))
    app.add_error_handler(Exception, errors.handle_error_async)
    app.add_error_handler(falcon.HTTPError, errors.handle_error_async)
    return ProxyFastPath(deps, app)


def get_app() -> ProxyFastPath:
    """The app for gunicorn, configured from env LLMUX_CONFIG and LLMUX_SOCKET."""
    logs.configure()
    config_path = os.environ.get("LLMUX_CONFIG", "/etc/llmux.toml")
    config = load_config(config_path)
    socket_path = os.environ.get("LLMUX_SOCKET") or config.daemon.socket
    return create_app(make_deps(config, socket_path))


def make_deps(config: Config, socket_path: str) -> Deps:
    http = UpstreamClient()
    # The daemon answers a lease within request_timeout_secs (504 after); the margin
    # keeps our own bound from firing first.
    leases = LeaseClient(socket_path, lease_timeout=config.policy.request_timeout_secs + 30.0,
                         http=http)
    return Deps(config=config, leases=leases, http=http, status_cache=StatusCache(leases))


# ---------------------------------------------------------------------------
# Middleware: request id, canonical paths, API keys, the canonical log line


class RequestContext:
    """Request id in and out, canonical paths only, Bearer keys, one log line per request.

    Keys are checked after routing and by default: every resource needs one when
    keys are set, except those that declare themselves open (``/health``, the
    readiness route)."""

    def __init__(self, deps: Deps) -> None:
        self.keys = frozenset(deps.config.proxy.api_keys)
        self.log = deps.request_log

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response
                              ) -> None:
        ctx = req.context
        ctx.started = time.monotonic()
        ctx.request_id = logs.request_id(req.get_header("X-Request-Id"))
        resp.set_header("X-Request-Id", ctx.request_id)
        scope = req.scope
        if not paths.is_canonical(scope.get("path") or req.path, scope.get("raw_path")):
            raise OpenAIError(404, "no such route (non-canonical path)",
                              "invalid_request_error", "not_found")

    async def process_resource(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                               resource: Any, params: dict[str, Any]) -> None:
        if not self.keys:
            return
        is_open = getattr(resource, "open", False)
        if callable(is_open):
            is_open = is_open(params)
        if not is_open:
            check_key(self.keys, req)

    async def process_response(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                               resource: Any, req_succeeded: bool) -> None:
        ctx = req.context
        if "request_id" not in ctx:
            return
        resp.set_header("X-Request-Id", ctx.request_id)
        self.log.info("request", request_id=ctx.request_id, method=req.method,
                      path=req.path, model=ctx.get("model"), status=resp.status_code,
                      error=ctx.get("error_code"), waited_ms=ctx.get("waited_ms"),
                      switched=ctx.get("switched"),
                      duration_ms=round((time.monotonic() - ctx.started) * 1000.0, 3))


def check_key(keys: frozenset[str], req: falcon.asgi.Request) -> None:
    """401 unless the request carries one of ``keys`` as a Bearer token."""
    if not auth.bearer_ok(keys, req.get_header("Authorization") or ""):
        raise auth.unauthorized()


# ---------------------------------------------------------------------------
# The proxied routes


class ProxyResource:
    """POST /v1/<route> that the fast path did not take: not an allow-listed route.

    The allow-listed ones never reach Falcon (llmuxd/proxy/fastpath.py serves them);
    this route is here so that every other ``/v1/...`` path answers like one: 401
    without a key (when keys are set), then 404 for POST, 405 for other methods."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                      route: str) -> None:
        raise OpenAIError(404, f"no such route: POST /v1/{route}", "invalid_request_error",
                          "not_found")


# ---------------------------------------------------------------------------
# Models, readiness, health


class ModelsResource:
    """GET /v1/models: configured models and aliases, with llmux's state."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = {"object": "list", "data": await model_list(self.deps)}


class ModelResource:
    """GET /v1/models/{id} (key needed) and GET /v1/models/{id}/ready (open).

    ``{id}`` may contain '/' (``Qwen/Qwen3-14B``), percent-encoded or not, so one
    path route serves both and tells them apart by the ``/ready`` suffix."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    @staticmethod
    def open(params: dict[str, Any]) -> bool:
        return str(params.get("rest", "")).endswith("/ready")

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                     rest: str) -> None:
        if rest.endswith("/ready"):
            await self._ready(resp, rest[:-len("/ready")])
            return
        for entry in await model_list(self.deps):
            if entry["id"] == rest:
                resp.media = entry
                return
        raise _model_not_found(rest)

    async def on_head(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                      rest: str) -> None:
        """HEAD answers like GET, without the body: what a load balancer's check sends."""
        await self.on_get(req, resp, rest)

    async def _ready(self, resp: falcon.asgi.Response, model: str) -> None:
        """200 when ACTIVE, 503 with the state otherwise, 404 when unknown; from a
        status at most ~1 s old (no lease, no round trip per check)."""
        try:
            status = await self.deps.status_cache.get()
            models: dict[str, Any] = status.get("models") or {}
        except (DaemonError, DaemonUnavailable):
            if self.deps.config.resolve_model(model) is None:
                raise _model_not_found(model) from None
            resp.status = 503
            resp.media = {"model": model, "state": "unavailable", "ready": False}
            return
        state = None
        for name, st in models.items():
            if model == name or model in (st.get("aliases") or ()):
                state = st.get("state")
                break
        else:
            raise _model_not_found(model)
        ready = state == "active"
        resp.status = 200 if ready else 503
        resp.media = {"model": model, "state": state, "ready": ready}


def _model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model '{model}' does not exist", "invalid_request_error",
                       "model_not_found", "model")


async def model_list(deps: Deps) -> list[dict[str, Any]]:
    """Models from the daemon's status (the truth after a reload), else from config."""
    try:
        status = await deps.leases.status()
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
    """GET /health: 200 only when the daemon answers on its socket. Open without a key."""

    open = True

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        try:
            daemon = await self.deps.leases.health()
        except (DaemonError, DaemonUnavailable) as exc:
            raise errors.daemon_unavailable(str(exc)) from None
        resp.media = {"status": "ok", "daemon": daemon}


class NotFoundSink:
    """Every path no route matched: 401 without a key (when keys are set), else 404."""

    def __init__(self, deps: Deps) -> None:
        self.keys = frozenset(deps.config.proxy.api_keys)

    async def __call__(self, req: falcon.asgi.Request, resp: falcon.asgi.Response | None,
                       **_: Any) -> None:
        if self.keys:
            check_key(self.keys, req)
        raise falcon.HTTPRouteNotFound()
