"""The OpenAI-compatible front end: a Falcon ASGI app, one event loop per worker.

One request: canonical path → route (an allow-list of vLLM's OpenAI routes) → API
key (deny by default) → bounded body read → ``model`` found without building the
body's tree → lease from llmuxd (which may wait for a switch; a client that leaves
meanwhile leaves the queue) → forward the original bytes to the child over TCP or
a Unix socket → relay the answer as it comes → release the lease with the outcome
when the body ends, fails, or the client goes away. The daemon resolves aliases and
answers ``model_not_found``, so the front end never disagrees with it after a
config reload.

gunicorn runs it with llmuxd/proxy/worker.py's worker class (uvicorn, uvloop,
httptools), which adds the head/body/write timeouts and the connection limit.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import falcon
import falcon.asgi
import structlog

from llmuxd.config import Config, load_config
from llmuxd.proxy import bodyscan, errors, logs, paths
from llmuxd.proxy.errors import OpenAIError
from llmuxd.proxy.lease_client import (
    ClientGone,
    DaemonError,
    DaemonUnavailable,
    Lease,
    LeaseClient,
    StatusCache,
)
from llmuxd.proxy.relay import HOP_BY_HOP, Outcome, ProxiedStream, response_headers
from llmuxd.proxy.upstream import (
    Aborted,
    UpstreamClient,
    UpstreamDeadline,
    UpstreamError,
    UpstreamIdle,
    describe,
)

log = structlog.get_logger("llmux.proxy")

# POST /v1/<route> that vLLM's OpenAI server answers with a JSON body naming a model
# (vllm/entrypoints/openai/api_server.py and the pooling routers). Everything else
# is 404: vLLM's dev endpoints (/sleep, /wake_up, /collective_rpc, ...) and LoRA
# loading are never reachable from here. Multipart routes (audio) are not proxied.
OPENAI_ROUTES = frozenset({
    "chat/completions", "completions", "embeddings", "responses", "score", "rerank",
    "messages", "classify", "pooling", "tokenize", "detokenize",
})
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Request headers the child must not see from the client.
# The body is sent at once, so "Expect: 100-continue" is not passed on either.
_DROP_TO_UPSTREAM = frozenset(
    name.encode() for name in HOP_BY_HOP | {"host", "content-length", "x-request-id",
                                            "expect", "x-forwarded-for"})
# Bodies larger than this are scanned on a thread, so the loop keeps serving streams.
_SCAN_ON_THREAD = 1 << 20


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


def create_app(deps: Deps) -> falcon.asgi.App:
    """Build the Falcon app around its dependencies (Falcon's factory idiom)."""
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
    return app


def get_app() -> falcon.asgi.App:
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
        given = req.get_header("X-Request-Id")
        ctx.request_id = given if given and _REQUEST_ID_RE.fullmatch(given) else os.urandom(
            12).hex()
        ctx.deferred = False
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
        if ctx.deferred:
            return  # the stream's close() writes the line with the final numbers
        self.log.info("request", request_id=ctx.request_id, method=req.method,
                      path=req.path, model=ctx.get("model"), status=resp.status_code,
                      error=ctx.get("error_code"), waited_ms=ctx.get("waited_ms"),
                      switched=ctx.get("switched"),
                      duration_ms=round((time.monotonic() - ctx.started) * 1000.0, 3))


def check_key(keys: frozenset[str], req: falcon.asgi.Request) -> None:
    """401 unless the request carries one of ``keys`` as a Bearer token."""
    auth = req.get_header("Authorization") or ""
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or key.strip() not in keys:
        raise OpenAIError(401, "invalid or missing API key (Authorization: Bearer)",
                          "authentication_error", "invalid_api_key")


# ---------------------------------------------------------------------------
# The proxied routes


class ProxyResource:
    """POST /v1/<route> with a JSON body naming a model: lease, forward, relay."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        proxy = deps.config.proxy
        self.max_body = proxy.max_body_bytes
        self.strip_auth = bool(proxy.api_keys)
        self.idle = proxy.upstream_idle_timeout_secs
        self.total = proxy.upstream_timeout_secs
        self.log = deps.request_log

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                      route: str) -> None:
        if route not in OPENAI_ROUTES:
            raise OpenAIError(404, f"no such route: POST /v1/{route}", "invalid_request_error",
                              "not_found")
        client = req.scope.get("llmux.conn")
        body = await self._read_body(req)
        found = await self._find_model(body)
        model = found.model
        ctx = req.context
        ctx.model = model
        asked = time.monotonic()
        lease = await self._lease(model, client)
        lease_ms = round((time.monotonic() - asked) * 1000.0, 3)
        ctx.waited_ms = lease.waited_ms
        ctx.switched = lease.switched
        started = time.monotonic()
        deadline = started + self.total
        try:
            if lease.served_model_name != model:
                body = bodyscan.rewrite(body, found, lease.served_model_name)
            # The query as the client sent it (bytes), never re-encoded.
            query = req.scope.get("query_string") or b""
            target = b"/v1/" + route.encode() + (b"?" + query if query else b"")
            request = self._request_bytes(req, target, lease.upstream, body)
            conn = await self.deps.http.send(lease.upstream, request, self.idle, deadline,
                                             client)
        except Aborted:
            self._release(lease, Outcome(status=499, error="client disconnected",
                                         duration_ms=(time.monotonic() - started) * 1e3))
            raise _client_gone("while its answer was being generated") from None
        except UpstreamError as exc:
            outcome = Outcome(status=502, error=str(exc),
                              duration_ms=(time.monotonic() - started) * 1e3)
            if isinstance(exc, UpstreamIdle | UpstreamDeadline):
                outcome.status = 504
                self._release(lease, outcome)
                raise _upstream_error(exc, lease.upstream) from None
            # The child failed: release with the answer awaited, so that when llmuxd
            # revoked the lease first (it killed a hung child, stopped the model) the
            # client learns why.
            why = await self._release_why(lease, outcome)
            raise errors.upstream_failed(f"{exc} ({why})" if why else str(exc)) from None
        except BaseException as exc:
            # Whatever went wrong (a bug included), the lease must not outlive it.
            self._release(lease, Outcome(status=500, error=f"{type(exc).__name__}: {exc}"))
            raise
        resp.status = conn.status
        content_type = ""
        for name, value in response_headers(conn.headers):
            if name == "content-type":
                content_type = value
            resp.append_header(name, value)
        outcome = Outcome(status=conn.status)
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

        resp.stream = ProxiedStream(self.deps.http, conn, started, self.idle, deadline,
                                    outcome, content_type.startswith("text/event-stream"),
                                    on_close, client)

    async def _read_body(self, req: falcon.asgi.Request) -> bytes:
        length = req.content_length
        if length is not None and length > self.max_body:
            raise OpenAIError(413, f"request body of {length} bytes is over the limit of "
                              f"{self.max_body} bytes", "invalid_request_error",
                              "request_too_large")
        body: bytes = await req.stream.read(self.max_body + 1)
        if len(body) > self.max_body:
            raise OpenAIError(413, f"request body is over the limit of {self.max_body} bytes",
                              "invalid_request_error", "request_too_large")
        if length is not None and len(body) < length:
            raise _client_gone("while sending its request body")
        return body

    async def _find_model(self, body: bytes) -> bodyscan.Found:
        """At most max_concurrent_body_parses at once per worker; big ones on a thread."""
        async with self.deps.parse_slots():
            try:
                if len(body) > _SCAN_ON_THREAD:
                    return await asyncio.to_thread(bodyscan.find_model, body)
                return bodyscan.find_model(body)
            except bodyscan.BodyError as exc:
                raise errors.bad_request(str(exc), exc.param) from None

    async def _lease(self, model: str, client: Any) -> Lease:
        leases = self.deps.leases
        try:
            tag, fut = await leases.begin(model)
            if client is None:
                return await leases.wait(fut)

            def gone() -> None:
                leases.cancel(tag, fut)

            client.on_lost(gone)
            if client.transport is None or client.transport.is_closing():
                gone()
            try:
                return await leases.wait(fut)
            finally:
                client.remove_on_lost(gone)
        except ClientGone:
            raise _client_gone(f"while waiting for model '{model}'") from None
        except DaemonError as exc:
            raise errors.from_daemon(exc.code, exc.message) from None
        except DaemonUnavailable as exc:
            raise errors.daemon_unavailable(str(exc)) from None

    def _release(self, lease: Lease, outcome: Outcome) -> None:
        self.deps.leases.release(lease.lease_id, outcome.release_body())

    async def _release_why(self, lease: Lease, outcome: Outcome) -> str:
        """Release and wait for the answer; why the lease was revoked ("" if it was not)."""
        try:
            answer = await self.deps.leases.release_now(lease.lease_id, outcome.release_body())
        except (DaemonError, DaemonUnavailable) as exc:
            log.warning("release_failed", lease_id=lease.lease_id, error=str(exc))
            self._release(lease, outcome)
            return ""
        revoked = answer.get("revoked")
        return f"lease revoked: {revoked}" if isinstance(revoked, str) and revoked else ""

    def _request_bytes(self, req: falcon.asgi.Request, target: bytes, upstream: str,
                       body: bytes) -> bytes:
        """The whole upstream request, head and body, for one write."""
        parts = [b"POST ", target, b" HTTP/1.1\r\nhost: ",
                 describe(upstream).encode("latin-1") if upstream.startswith("http")
                 else b"localhost", b"\r\n"]
        forwarded = b""
        for name, value in req.scope["headers"]:
            if name in _DROP_TO_UPSTREAM or (self.strip_auth and name == b"authorization"):
                if name == b"x-forwarded-for":
                    forwarded = value
                continue
            if name == b"content-type":
                continue
            parts += [name, b": ", value, b"\r\n"]
        client = req.scope.get("client")
        if client:
            peer = client[0].encode("latin-1")
            forwarded = forwarded + b", " + peer if forwarded else peer
        if forwarded:
            parts += [b"x-forwarded-for: ", forwarded, b"\r\n"]
        parts += [b"content-type: application/json\r\ncontent-length: ",
                  str(len(body)).encode(), b"\r\nx-request-id: ",
                  req.context.request_id.encode(), b"\r\n\r\n", body]
        return b"".join(parts)


def _client_gone(when: str) -> OpenAIError:
    # Nobody is left to read an answer; 499 (nginx's "client closed request") names
    # it in the log line.
    return OpenAIError(499, f"client closed the connection {when}", "invalid_request_error",
                       "client_closed")


def _upstream_error(exc: UpstreamError, upstream: str) -> OpenAIError:
    if isinstance(exc, UpstreamIdle):
        return OpenAIError(504, f"model server sent nothing for the idle timeout "
                           f"({describe(upstream)})", "timeout_error",
                           "upstream_idle_timeout")
    if isinstance(exc, UpstreamDeadline):
        return OpenAIError(504, f"model server did not answer within the total timeout "
                           f"({describe(upstream)})", "timeout_error", "upstream_timeout")
    return errors.upstream_failed(str(exc))


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
