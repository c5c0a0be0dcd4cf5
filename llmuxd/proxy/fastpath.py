"""The proxied OpenAI routes as a raw ASGI handler, in front of the Falcon app.

Why: ``POST /v1/<allow-listed route>`` is the hot path, and under Falcon each one
built a Request and a Response object, ran three middleware hooks, routed, and
went through Falcon's response cycle: a large share of the worker's CPU per
request (docs/benchmarks.md, "Third pass"). This handler serves exactly those
requests straight from the ASGI scope; every other request (``/v1/models``,
``/health``, readiness, unknown routes and methods, non-canonical paths) goes to
the Falcon app unchanged, so there is one place that answers 404/405/401 for
everything that is not proxied.

What a proxied request gets here is what it got under Falcon, by calling the same
modules: canonical path and the allow-list (``paths``), the key check (deny by
default, ``auth``), the body limit (413), ``model`` found without building the
body's tree (``bodyscan``), the lease (``lease_client``; the daemon resolves
aliases), the forward and relay (``upstream``, ``relay``), cancel on disconnect,
the idle and total timeouts, X-Request-Id both ways, the request's log line
(``logs``), and every error in the OpenAI shape (``errors``).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmuxd.proxy import auth, bodyscan, errors, logs, paths
from llmuxd.proxy.errors import OpenAIError
from llmuxd.proxy.lease_client import ClientGone, DaemonError, DaemonUnavailable, Lease
from llmuxd.proxy.relay import HOP_BY_HOP, STOPPING, Outcome, ProxiedStream, response_headers
from llmuxd.proxy.upstream import (
    Aborted,
    UpstreamDeadline,
    UpstreamError,
    UpstreamIdle,
    describe,
)

if TYPE_CHECKING:
    from llmuxd.proxy.app import Deps

Scope = dict[str, Any]
Receive = Any
Send = Any

# Request headers the child must not see from the client.
# The body is sent at once, so "Expect: 100-continue" is not passed on either.
_DROP_TO_UPSTREAM = frozenset(
    name.encode() for name in HOP_BY_HOP | {"host", "content-length", "x-request-id",
                                            "expect", "x-forwarded-for"})
# Bodies larger than this are scanned on a thread, so the loop keeps serving streams.
_SCAN_ON_THREAD = 1 << 20
_JSON = b"application/json"
_EOF: dict[str, Any] = {"type": "http.response.body", "body": b"", "more_body": False}


class ProxyFastPath:
    """ASGI app: the allow-listed ``POST /v1/<route>`` here, everything else to ``app``."""

    def __init__(self, deps: Deps, app: Any) -> None:
        self.app = app
        self.deps = deps
        proxy = deps.config.proxy
        self.keys = frozenset(proxy.api_keys)
        self.max_body = proxy.max_body_bytes
        self.strip_auth = bool(proxy.api_keys)
        self.idle = proxy.upstream_idle_timeout_secs
        self.total = proxy.upstream_timeout_secs
        self.log = deps.request_log

    def flush_held(self) -> None:
        """Write what waits to be written lazily (lease lines, log lines): the worker
        calls it when its server has stopped, before its event loop ends."""
        self.deps.leases.flush_now()
        self.log.out.write_out()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._route(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        await Exchange(self, scope, receive, send, route).run()

    @staticmethod
    def _route(scope: Scope) -> str | None:
        """The allow-listed route of a canonical ``POST /v1/<route>``, else None."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        path: str = scope["path"]
        if not path.startswith("/v1/"):
            return None
        route = path[4:-1] if path.endswith("/") else path[4:]
        if route not in paths.OPENAI_ROUTES:
            return None
        # "/v1/<allow-listed route>[/]" is canonical as decoded; it stays so if nothing
        # in the target was percent-decoded into it (the common case: one compare).
        raw = scope.get("raw_path")
        if raw != path.encode() and not paths.is_canonical(path, raw):
            return None
        return route


class Exchange:
    """One proxied request, from its scope to the end of its answer."""

    __slots__ = ("client", "fp", "lease_ms", "model", "path", "receive", "request_id",
                 "responded", "route", "scope", "send", "sse", "started", "switched",
                 "waited_ms", "write")

    def __init__(self, fp: ProxyFastPath, scope: Scope, receive: Receive, send: Send,
                 route: str) -> None:
        self.fp = fp
        self.scope = scope
        self.receive = receive
        self.send = send
        self.route = route
        self.started = time.monotonic()
        path: str = scope["path"]
        # The path as Falcon's router saw it (one trailing slash stripped), for the log.
        self.path = path[:-1] if path.endswith("/") else path
        self.client = scope.get("llmux.conn")
        self.request_id = ""
        self.model: str | None = None
        self.waited_ms: float | None = None
        self.switched: bool | None = None
        self.lease_ms = 0.0
        self.responded = False  # the answer's head went out
        self.sse = False
        self.write: Callable[[bytes], None] | None = None  # frames a pushed piece

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            # Only uvicorn cancels a request's task: the worker is stopping and its
            # graceful time is nearly over (worker.shutdown_grace). The request ends
            # here rather than with the worker: its lease was released and its log
            # line written on the way out (ProxiedStream.close, _forward); its client
            # is told. Not re-raised: uvicorn would log it as a crash and answer a
            # request that has no answer yet with a plain-text 500.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await self._stopping()

    async def _stopping(self) -> None:
        if not self.responded:
            await self._answer_error(errors.frontend_stopping())
            return
        if self.sse and self.write is not None:
            self.write(errors.sse_event(errors.frontend_stopping().body()))
        # Cut, so that the answer does not read as complete.
        if self.client is not None:
            self.client.abort()

    async def _run(self) -> None:
        given = authorization = length = None
        for name, value in self.scope["headers"]:
            # Repeated headers are joined with "," as Falcon does (so a repeated
            # X-Request-Id or Authorization is refused the same way).
            if name == b"x-request-id":
                given = value if given is None else given + b"," + value
            elif name == b"authorization":
                authorization = value if authorization is None else authorization + b"," + value
            elif name == b"content-length":
                length = value
        self.request_id = logs.request_id(given.decode("latin-1") if given else None)
        try:
            if self.fp.keys and not auth.bearer_ok(
                    self.fp.keys, authorization.decode("latin-1") if authorization else ""):
                raise auth.unauthorized()
            body = await self._read_body(length)
            stream, status, headers = await self._forward(body)
        except Exception as exc:
            await self._answer_error(exc)
            return
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        self.responded = True
        cycle = getattr(self.send, "__self__", None)  # uvicorn's RequestResponseCycle
        if cycle is not None and self.client is not None and not _has_length(headers):
            # A streamed answer (SSE): pushed piece by piece, framed as uvicorn frames
            # a chunked body, through the cycle's transport (which keeps the head first).
            transport = cycle.transport

            def write(piece: bytes) -> None:
                # The client may be gone before its close callback has run.
                if not cycle.disconnected and not transport.is_closing():
                    transport.write(b"%x\r\n%s\r\n" % (len(piece), piece))

            self.write = write

            try:
                await stream.push(write, cycle.flow)
            finally:
                await stream.close()
            await self.send(_EOF)
            return
        more = True
        try:
            async for chunk in stream:
                more = not stream.complete
                await self.send({"type": "http.response.body", "body": chunk,
                                 "more_body": more})
        finally:
            await stream.close()
        if more:
            await self.send(_EOF)

    # -- the request ---------------------------------------------------------

    async def _read_body(self, length: bytes | None) -> bytes:
        limit = self.fp.max_body
        expected = None
        if length is not None:
            try:
                expected = int(length)
            except ValueError:
                raise errors.bad_request("invalid Content-Length header") from None
            if expected > limit:
                raise OpenAIError(413, f"request body of {expected} bytes is over the limit "
                                  f"of {limit} bytes", "invalid_request_error",
                                  "request_too_large")
        parts: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _client_gone("while sending its request body")
            piece = message.get("body") or b""
            size += len(piece)
            if size > limit:
                raise OpenAIError(413, f"request body is over the limit of {limit} bytes",
                                  "invalid_request_error", "request_too_large")
            parts.append(piece)
            if not message.get("more_body"):
                break
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        if expected is not None and len(body) < expected:
            raise _client_gone("while sending its request body")
        return body

    async def _find_model(self, body: bytes) -> bodyscan.Found:
        """At most max_concurrent_body_parses at once per worker; big ones on a thread.

        A small body is parsed on the loop without awaiting, so while a slot is free it
        takes one only for the length of a call nothing else can run during: it needs
        no acquire (two awaits of the semaphore per request, the common case)."""
        slots = self.fp.deps.parse_slots()
        try:
            if len(body) <= _SCAN_ON_THREAD and not slots.locked():
                return bodyscan.find_model(body)
            async with slots:
                if len(body) > _SCAN_ON_THREAD:
                    return await asyncio.to_thread(bodyscan.find_model, body)
                return bodyscan.find_model(body)
        except bodyscan.BodyError as exc:
            raise errors.bad_request(str(exc), exc.param) from None

    async def _forward(self, body: bytes) -> tuple[ProxiedStream, int,
                                                   list[tuple[bytes, bytes]]]:
        """Lease, send, and the child's answer head: (body stream, status, headers)."""
        fp = self.fp
        found = await self._find_model(body)
        model = self.model = found.model
        asked = time.monotonic()
        lease = await self._lease(model)
        self.lease_ms = round((time.monotonic() - asked) * 1000.0, 3)
        self.waited_ms = lease.waited_ms
        self.switched = lease.switched
        started = time.monotonic()
        deadline = started + fp.total
        try:
            if lease.served_model_name != model:
                body = bodyscan.rewrite(body, found, lease.served_model_name)
            request = self._request_bytes(lease.upstream, body)
            conn = await fp.deps.http.send(lease.upstream, request, fp.idle, deadline,
                                           self.client)
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
        except asyncio.CancelledError:
            self._release(lease, Outcome(status=503, error=STOPPING,
                                         duration_ms=(time.monotonic() - started) * 1e3))
            raise
        except BaseException as exc:
            # Whatever went wrong (a bug included), the lease must not outlive it.
            self._release(lease, Outcome(status=500, error=f"{type(exc).__name__}: {exc}"))
            raise
        headers = [(b"x-request-id", self.request_id.encode())]
        typed = False
        sse = False
        for name, value in response_headers(conn.headers):
            if name == b"content-type":
                typed = True
                sse = self.sse = value.startswith(b"text/event-stream")
            headers.append((name, value))
        if not typed:
            headers.append((b"content-type", _JSON))  # Falcon's default media type

        def on_close(result: Outcome) -> None:
            self._release(lease, result)
            fp.log.proxied(self.request_id, self.path, model, lease.served_model_name,
                           result.status, result.error, lease.waited_ms, self.lease_ms,
                           lease.switched, result.bytes, result.ttfb_ms,
                           round(result.duration_ms, 3),
                           round((time.monotonic() - self.started) * 1000.0, 3))

        stream = ProxiedStream(fp.deps.http, conn, started, fp.idle, deadline,
                               Outcome(status=conn.status), sse, on_close, self.client)
        return stream, conn.status, headers

    async def _lease(self, model: str) -> Lease:
        leases = self.fp.deps.leases
        lease = leases.local(model)  # a standing grant: no round trip
        if lease is not None:
            return lease
        client = self.client
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
        self.fp.deps.leases.finish(lease, outcome.status, outcome.duration_ms,
                                   outcome.release_json)

    async def _release_why(self, lease: Lease, outcome: Outcome) -> str:
        """Release and wait for the answer; why the lease was revoked ("" if it was not)."""
        try:
            answer = await self.fp.deps.leases.release_now(lease, outcome.release_body())
        except (DaemonError, DaemonUnavailable) as exc:
            errors.log.warning("release_failed", lease_id=lease.lease_id, error=str(exc))
            self._release(lease, outcome)
            return ""
        revoked = answer.get("revoked")
        return f"lease revoked: {revoked}" if isinstance(revoked, str) and revoked else ""

    def _request_bytes(self, upstream: str, body: bytes) -> bytes:
        """The whole upstream request, head and body, for one write."""
        scope = self.scope
        # The query as the client sent it (bytes), never re-encoded.
        query = scope.get("query_string") or b""
        parts = [b"POST /v1/", self.route.encode(), b"?" + query if query else b"",
                 b" HTTP/1.1\r\nhost: ", _host_header(upstream), b"\r\n"]
        forwarded = b""
        strip_auth = self.fp.strip_auth
        for name, value in scope["headers"]:
            if name in _DROP_TO_UPSTREAM or (strip_auth and name == b"authorization"):
                if name == b"x-forwarded-for":
                    forwarded = value
                continue
            if name == b"content-type":
                continue
            parts += [name, b": ", value, b"\r\n"]
        client = scope.get("client")
        if client:
            peer = client[0].encode("latin-1")
            forwarded = forwarded + b", " + peer if forwarded else peer
        if forwarded:
            parts += [b"x-forwarded-for: ", forwarded, b"\r\n"]
        parts += [b"content-type: application/json\r\ncontent-length: ",
                  str(len(body)).encode(), b"\r\nx-request-id: ",
                  self.request_id.encode(), b"\r\n\r\n", body]
        return b"".join(parts)

    # -- errors --------------------------------------------------------------

    async def _answer_error(self, exc: Exception) -> None:
        """The OpenAI error for ``exc`` and the request's log line, as under Falcon."""
        err = errors.as_openai(exc, "POST", self.path, self.request_id)
        body = err.body()
        headers = [(b"x-request-id", self.request_id.encode()),
                   (b"content-type", _JSON),
                   (b"content-length", str(len(body)).encode())]
        headers += [(name.lower().encode("latin-1"), value.encode("latin-1"))
                    for name, value in err.headers.items()]
        await self.send({"type": "http.response.start", "status": err.status,
                         "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})
        self.fp.log.info("request", request_id=self.request_id, method="POST",
                         path=self.path, model=self.model, status=err.status,
                         error=err.code, waited_ms=self.waited_ms, switched=self.switched,
                         duration_ms=round((time.monotonic() - self.started) * 1000.0, 3))


@functools.lru_cache(maxsize=256)
def _host_header(upstream: str) -> bytes:
    """The Host header for the child at ``upstream`` (parsed once per upstream)."""
    return describe(upstream).encode("latin-1") if upstream.startswith("http") \
        else b"localhost"


def _has_length(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"content-length" for name, _ in headers)


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
