"""The simulated `vllm serve`: start-up, HTTP routing, dev endpoints, shutdown.

Process shape as in vLLM: this API-server process plus an EngineCore child in the
same process group (the child holds the simulated GPU memory). Start-up binds the
port first (a port clash fails fast) but listens only once the engine is ready, so
/health is "connection refused" until then, as with real vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import NoReturn

from vllmsim import openai_api
from vllmsim.engine import Engine
from vllmsim.errors import (
    NOT_FOUND,
    SimHttpError,
    method_not_allowed,
    openai_error,
    plain_bad_request,
    validation_error,
)
from vllmsim.faults import FaultError
from vllmsim.httpio import BadHttp, Request, Responder, dumps, read_request
from vllmsim.metrics import SimMetrics
from vllmsim.options import SimOptions

BACKLOG = 2048          # uvicorn's default, which vLLM's API server keeps
log = logging.getLogger("llmux.sim")

Handler = Callable[["SimServer", Request, Responder], Awaitable[None]]

VERSION = "0.32.0"


class SimServer:
    """One simulated vLLM server."""

    def __init__(self, opts: SimOptions, gpus: list[int], sock: socket.socket) -> None:
        self.opts = opts
        self.sock = sock
        self.metrics = SimMetrics(opts.model_name)
        self.engine = Engine(opts, gpus, self.metrics)
        self.engine.on_death = self._engine_died
        self.stop_event = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.exit_code = 0
        self.served = 0
        self.routes: dict[str, dict[str, Handler]] = {}
        self._build_routes()

    # -- routing -----------------------------------------------------------------------

    def _route(self, method: str, path: str, handler: Handler) -> None:
        self.routes.setdefault(path, {})[method] = handler

    def _build_routes(self) -> None:
        r = self._route
        r("GET", "/health", _health)
        r("GET", "/version", _version)
        r("GET", "/load", _load)
        r("GET", "/metrics", _metrics)
        r("GET", "/v1/models", openai_api.models)
        r("POST", "/v1/completions", openai_api.completions)
        r("POST", "/v1/chat/completions", openai_api.chat)
        r("POST", "/v1/embeddings", openai_api.embeddings)
        r("POST", "/tokenize", openai_api.tokenize)
        if self.opts.dev_mode:
            r("POST", "/sleep", _sleep)
            r("POST", "/wake_up", _wake_up)
            r("GET", "/is_sleeping", _is_sleeping)
            r("POST", "/collective_rpc", _collective_rpc)
            r("POST", "/reset_prefix_cache", _reset_prefix_cache)
        if self.opts.fault_api:
            r("GET", "/_sim/state", _sim_state)
            r("GET", "/_sim/faults", _sim_faults)
            r("POST", "/_sim/faults", _sim_faults)

    async def _dispatch(self, req: Request, resp: Responder) -> None:
        methods = self.routes.get(req.path)
        if methods is None:
            raise NOT_FOUND
        handler = methods.get(req.method)
        if handler is None:
            raise method_not_allowed(sorted(methods))
        if self.opts.api_key and req.path.startswith("/v1/"):
            auth = req.headers.get("authorization", "")
            if auth != f"Bearer {self.opts.api_key}":
                raise SimHttpError(401, {"error": "Unauthorized"})
        await handler(self, req, resp)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        resp = Responder(reader, writer)
        first = True
        try:
            while not resp.close_after:
                try:
                    if first:
                        req = await read_request(reader)
                        first = False
                    else:  # uvicorn closes a connection idle for VLLM_HTTP_TIMEOUT_KEEP_ALIVE
                        req = await asyncio.wait_for(read_request(reader),
                                                     self.opts.keep_alive_s)
                except TimeoutError:
                    break
                except BadHttp as e:
                    await resp.send_json(e.status, openai_error(e.status, str(e), "Bad Request"),
                                         close=True)
                    break
                if req is None:
                    break
                resp.started = False
                resp.close_after = not req.keep_alive
                try:
                    await self._dispatch(req, resp)
                except SimHttpError as e:
                    if resp.started:
                        resp.close_after = True
                    else:
                        await resp.send(e.status, dumps(e.body), headers=e.headers,
                                        close=e.close)
                except Exception:  # a bug: answer like vLLM would, keep the server alive
                    log.exception("unhandled error on %s %s", req.method, req.path)
                    if not resp.started:
                        await resp.send_json(
                            500, openai_error(500, "Internal Server Error",
                                              "InternalServerError"), close=True)
                    resp.close_after = True
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- lifecycle ---------------------------------------------------------------------

    def request_done(self) -> None:
        """Count an answered inference request (for the exit_after fault)."""
        self.served += 1
        self.engine.requests_served = self.served
        limit = self.opts.faults.value("exit_after")
        if limit is not None and self.served >= int(limit):
            log.error("fault exit_after: exiting after %d requests", self.served)
            asyncio.get_running_loop().call_later(0.05, self._hard_exit, 1)

    async def die(self, why: str) -> NoReturn:
        """Crash now (fault die_mid_stream): flush what was sent, then _exit(1)."""
        log.error("%s", why)
        await asyncio.sleep(0.05)
        self._hard_exit(1)

    def _hard_exit(self, code: int) -> NoReturn:
        sys.stderr.flush()
        os._exit(code)

    def _engine_died(self) -> None:
        # vLLM: /health turns 503, then the server shuts itself down.
        self.exit_code = 1
        asyncio.get_running_loop().call_later(1.0, self.stop_event.set)

    def _on_signal(self, signum: int) -> None:
        if "ignore_sigterm" in self.opts.faults and signum == signal.SIGTERM:
            log.warning("fault ignore_sigterm: ignoring SIGTERM")
            return
        log.info("received signal %d, shutting down", signum)
        self.stop_event.set()

    async def _wait_or_stop(self, seconds: float) -> bool:
        """Sleep `seconds` unless asked to stop first; True when asked to stop."""
        try:
            await asyncio.wait_for(self.stop_event.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        faults = self.opts.faults
        timing = self.opts.timing
        if "crash_at_start" in faults:
            await self._wait_or_stop(min(1.0, timing.start_s() / 2))
            log.error("fault crash_at_start: RuntimeError: Engine core initialization failed. "
                      "See root cause above. Failed core proc(s): {}")
            return 1
        error = await self.engine.start_core()
        if error is not None:
            log.error("%s", error)
            log.error("RuntimeError: Engine core initialization failed. See root cause above. "
                      "Failed core proc(s): {'EngineCore': 1}")
            await self.engine.core.stop()
            return 1
        log.info("EngineCore pid %s holds the model; loading (%.2f s)",
                 self.engine.core.pid, timing.start_s())
        delay = timing.start_s() + float(faults.value("slow_start") or 0)
        if await self._wait_or_stop(delay):
            return await self._shutdown()
        if "never_healthy" in faults:
            log.warning("fault never_healthy: the server will never listen")
            await self.stop_event.wait()
            return await self._shutdown()
        if self.engine.dead:
            return 1
        # uvicorn's (so vLLM's) default backlog. asyncio's own default (100) would
        # re-listen with 100: on a Unix socket a burst of connects beyond it fails at
        # once with EAGAIN (no SYN retry as with TCP), e.g. ~180 waiters granted
        # together when a model wakes, which real vLLM never shows.
        self.sock.listen(BACKLOG)
        self.sock.setblocking(False)
        self.server = await asyncio.start_server(self._connection, sock=self.sock,
                                                 limit=256 * 1024, backlog=BACKLOG)
        if self.sock.family == socket.AF_UNIX:
            log.info("Starting vLLM API server 0 on %s", self.sock.getsockname())
        else:
            host, port = self.sock.getsockname()[:2]
            log.info("Starting vLLM API server 0 on http://%s:%d", host, port)
        log.info("Application startup complete.")
        await self.stop_event.wait()
        return await self._shutdown()

    async def _shutdown(self) -> int:
        """SIGTERM: stop listening, end running requests, wait for parked ones, exit."""
        log.info("Shutting down")
        self.engine.shutting_down = True
        if self.server is not None:
            self.server.close()
        self.engine.abort_all()
        for _ in range(200):
            if not self.engine.running:
                break
            await asyncio.sleep(0.01)
        # A request parked on a sleeping engine keeps vLLM alive until its client
        # goes away (VLLM_API.md): mirror that, so llmuxd's SIGKILL path is exercised.
        while self.engine.parked:
            await asyncio.sleep(0.1)
        await self.engine.core.stop()
        return self.exit_code


# -- handlers ----------------------------------------------------------------------------


async def _health(srv: SimServer, req: Request, resp: Responder) -> None:
    await resp.send(503 if srv.engine.dead else 200, b"", content_type=None)


async def _version(srv: SimServer, req: Request, resp: Responder) -> None:
    await resp.send_json(200, {"version": VERSION})


async def _load(srv: SimServer, req: Request, resp: Responder) -> None:
    await resp.send_json(200, {"server_load": len(srv.engine.running) + srv.engine.parked})


async def _metrics(srv: SimServer, req: Request, resp: Responder) -> None:
    e = srv.engine
    text = srv.metrics.render(running=len(e.running), waiting=0,
                              sleep_state=e.sleep_state_metric(), kv_usage=e.kv_usage())
    await resp.send(200, text.encode(), content_type="text/plain; version=0.0.4; charset=utf-8")


def _int_query(req: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = req.q(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise validation_error(
            "int_parsing", f"query.{name}",
            "Input should be a valid integer, unable to parse string as an integer", raw,
        ) from None
    if value > hi:
        raise validation_error("less_than_equal", f"query.{name}",
                               f"Input should be less than or equal to {hi}", raw, {"le": hi})
    if value < lo:
        raise validation_error("greater_than_equal", f"query.{name}",
                               f"Input should be greater than or equal to {lo}", raw, {"ge": lo})
    return value


async def _sleep(srv: SimServer, req: Request, resp: Responder) -> None:
    level = _int_query(req, "level", 1, 0, 2)
    mode = req.q("mode") or "abort"
    if mode not in ("abort", "wait", "keep"):
        raise validation_error(
            "literal_error", "query.mode", "Input should be 'abort', 'wait' or 'keep'", mode,
            {"expected": "'abort', 'wait' or 'keep'"},
        )
    await srv.engine.sleep(level, mode)
    await resp.send_json(200, {"status": "sleeping", "level": level})


async def _wake_up(srv: SimServer, req: Request, resp: Responder) -> None:
    tags = req.query.get("tags") or None
    fully = await srv.engine.wake(tags)
    await resp.send_json(200, {"status": "awake" if fully else "sleeping", "tags": tags})


async def _is_sleeping(srv: SimServer, req: Request, resp: Responder) -> None:
    await resp.send_json(200, {"is_sleeping": srv.engine.is_sleeping})


async def _collective_rpc(srv: SimServer, req: Request, resp: Responder) -> None:
    try:
        body = req.json()
    except (ValueError, UnicodeDecodeError) as e:
        raise plain_bad_request(f"JSON decode error: {e}") from None
    if not isinstance(body, dict):
        raise plain_bad_request("Request body must be a JSON object")
    method = body.get("method")
    if method is None:
        raise plain_bad_request("Missing 'method' in request body")
    if method == "reload_weights":
        results = await srv.engine.reload_weights()
        await resp.send_json(200, {"results": results})
        return
    raise SimHttpError(500, openai_error(
        500, f"Call to collective_rpc method failed: Method '{method}' is not implemented.",
        "InternalServerError"), close=True)


async def _reset_prefix_cache(srv: SimServer, req: Request, resp: Responder) -> None:
    await resp.send_json(200, {"success": True})


async def _sim_state(srv: SimServer, req: Request, resp: Responder) -> None:
    e = srv.engine
    await resp.send_json(200, {
        "model": srv.opts.model,
        "served_model_names": srv.opts.served_model_names,
        "pid": os.getpid(),
        "engine_pid": e.core.pid,
        "gpus": e.gpus,
        "sleeping": e.sleeping,
        "level": e.level,
        "paused": e.paused,
        "weights_on_gpu": e.weights_on,
        "kv_cache_on_gpu": e.kv_on,
        "weights_valid": e.weights_valid,
        "usage_mib": e.usage(e.mem_weights, e.mem_kv) if srv.opts.gpu_state else {},
        "host_weights_bytes": (int(e.timing.size_gib * (1 << 30) * srv.opts.host_ram_factor)
                               if e.host_weights else 0),
        "running": len(e.running),
        "parked": e.parked,
        "parked_total": e.parked_total,
        "requests_served": srv.served,
        "faults": srv.opts.faults.as_dict(),
        "enable_sleep_mode": srv.opts.enable_sleep_mode,
        "timing": vars(e.timing),
    })


async def _sim_faults(srv: SimServer, req: Request, resp: Responder) -> None:
    if req.method == "POST":
        try:
            body = req.json()
        except (ValueError, UnicodeDecodeError) as e:
            raise plain_bad_request(f"JSON decode error: {e}") from None
        if not isinstance(body, dict) or not isinstance(body.get("set", {}), dict) \
                or not isinstance(body.get("clear", []), list):
            raise plain_bad_request('body must be {"set": {NAME: ARG|true}, "clear": [NAME]}')
        try:
            srv.opts.faults.update(body.get("set", {}), body.get("clear", []))
        except FaultError as e:
            raise plain_bad_request(str(e)) from None
        log.info("faults now %s", srv.opts.faults.as_dict())
    await resp.send_json(200, {"faults": srv.opts.faults.as_dict()})
