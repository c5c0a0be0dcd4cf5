"""The control API's routes: one registry of (method, path) → handler, one error mapper.

Handlers are small functions; anything they raise is turned into the one error
shape here (``dispatch``), so a route can never leak a traceback to a client.
Handlers reach the daemon only through the command port (control/port.py): the
ones that change model state run on the loop thread behind it; the lease routes
use the lease table's fast path directly.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import structlog

from llmuxd.config import ConfigError, load_config
from llmuxd.control.port import CommandPort
from llmuxd.errors import ApiError

log = structlog.get_logger("llmuxd.control")

MAX_LOG_LINES = 10000


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: bytes
    peer_pid: int
    peer_uid: int
    keep_alive: bool
    cancelled: Callable[[], bool]

    def json(self) -> dict[str, Any]:
        """The body as a JSON object ({} when empty), or bad_request."""
        if not self.body.strip():
            return {}
        try:
            data = json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError("bad_request", f"malformed JSON body: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError("bad_request", "the JSON body must be an object")
        return data

    def flag(self, name: str, default: bool) -> bool:
        value = self.query.get(name)
        if value is None:
            return default
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ApiError("bad_request", f"query parameter {name} must be 0 or 1")


Handler = Callable[[CommandPort, Request, dict[str, str]], tuple[int, Any]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler

    @property
    def mutating(self) -> bool:
        return self.method != "GET"


ROUTES: list[Route] = []


def route(method: str, path: str) -> Callable[[Handler], Handler]:
    """Register a handler; ``{name}`` in the path matches one segment."""
    regex = "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$"

    def register(fn: Handler) -> Handler:
        ROUTES.append(Route(method, re.compile(regex), fn))
        return fn
    return register


def _find(req: Request) -> tuple[Route | None, dict[str, str], list[str]]:
    """The route for a request, its path parameters, and the methods the path allows.

    The two lease routes run on every proxied request: they are matched first by a
    plain string test, before the general regex scan.
    """
    path = req.path
    if req.method == "POST":
        if path == "/v1/leases":
            return _ACQUIRE, {}, []
        if path.startswith("/v1/leases/") and path.endswith("/release"):
            lease_id = path[len("/v1/leases/"):-len("/release")]
            if lease_id and "/" not in lease_id:
                return _RELEASE, {"lease": unquote(lease_id)}, []
    allowed = []
    for r in ROUTES:
        match = r.pattern.match(path)
        if match is None:
            continue
        if r.method != req.method:
            allowed.append(r.method)
            continue
        return r, {k: unquote(v) for k, v in match.groupdict().items()}, []
    return None, {}, allowed


def dispatch(sup: CommandPort, req: Request, may_mutate: bool) -> tuple[int, Any]:
    """Route a request and map every failure to the API's error shape."""
    try:
        r, params, allowed = _find(req)
        if r is not None:
            if r.mutating and not may_mutate:
                raise ApiError("permission_denied",
                               f"uid {req.peer_uid} may not {req.method} {req.path}: "
                               "needs root, the daemon's user or the socket's group")
            return r.handler(sup, req, params)
        if allowed:
            raise ApiError("not_found", f"{req.method} {req.path}: method not allowed "
                           f"(use {', '.join(sorted(set(allowed)))})")
        raise ApiError("not_found", f"no route {req.method} {req.path}")
    except ApiError as exc:
        return exc.status, exc.to_dict()
    except Exception:
        log.exception("control_internal_error", method=req.method, path=req.path)
        err = ApiError("internal", "internal error (see the daemon log)")
        return err.status, err.to_dict()


# ---------------------------------------------------------------------------
# Daemon


@route("GET", "/v1/health")
def health(sup: CommandPort, req: Request, _p: dict[str, str]) -> tuple[int, Any]:
    return 200, sup.health()


@route("GET", "/v1/status")
def status(sup: CommandPort, req: Request, _p: dict[str, str]) -> tuple[int, Any]:
    return 200, sup.status()


@route("POST", "/v1/reload")
def reload(sup: CommandPort, req: Request, _p: dict[str, str]) -> tuple[int, Any]:
    try:
        new = load_config(sup.config_path)
    except ConfigError as exc:
        raise ApiError("bad_request", "the new config was rejected; the old one stays: "
                       + "; ".join(exc.errors), errors=exc.errors) from None
    return 200, sup.reload(new)


# ---------------------------------------------------------------------------
# Models


@route("GET", "/v1/models/{m}")
def model_status(sup: CommandPort, req: Request, p: dict[str, str]) -> tuple[int, Any]:
    name = sup.resolve(p["m"])
    return 200, sup.model_status(name)


def _activate(sup: CommandPort, req: Request, p: dict[str, str], op: str) -> tuple[int, Any]:
    name = sup.resolve(p["m"])
    wait = req.flag("wait", True)
    return (200 if wait else 202), sup.activate(name, op, wait)


@route("POST", "/v1/models/{m}/start")
def start(sup: CommandPort, req: Request, p: dict[str, str]) -> tuple[int, Any]:
    return _activate(sup, req, p, "start")


@route("POST", "/v1/models/{m}/wake")
def wake(sup: CommandPort, req: Request, p: dict[str, str]) -> tuple[int, Any]:
    return _activate(sup, req, p, "wake")


@route("POST", "/v1/models/{m}/switch")
def switch(sup: CommandPort, req: Request, p: dict[str, str]) -> tuple[int, Any]:
    return _activate(sup, req, p, "switch")


@route("POST", "/v1/models/{m}/sleep")
def sleep(sup: CommandPort, req: Request, p: dict[str, str]) -> tuple[int, Any]:
    name = sup.resolve(p["m"])
    body = req.json()
    level = body.get("level", sup.config.models[name].sleep_level)
    if level not in (1, 2, 3) or isinstance(level, bool):
        raise ApiError("bad_request", "level must be 1, 2 or 3", model=name)
    wait = req.flag("wait", True)
    return (200 if wait else 202), sup.sleep(name, level, wait)


@route("POST", "/v1/models/{m}/kill")
def kill(sup: CommandPort, req: Request, p: dict[str, str]) -> tuple[int, Any]:
    name = sup.resolve(p["m"])
    wait = req.flag("wait", True)
    return (200 if wait else 202), sup.kill(name, wait)


@route("GET", "/v1/models/{m}/logs")
def logs(sup: CommandPort, req: Request, p: dict[str, str]) -> tuple[int, Any]:
    from llmuxd.child import log_file_name, tail_file
    name = sup.resolve(p["m"])
    raw = req.query.get("lines", "100")
    if not raw.isdigit() or not 0 < int(raw) <= MAX_LOG_LINES:
        raise ApiError("bad_request", f"lines must be 1..{MAX_LOG_LINES}", model=name)
    path = Path(sup.config.daemon.log_dir) / log_file_name(name)
    lines = tail_file(path, int(raw)) if path.exists() else []
    return 200, {"model": name, "path": str(path), "lines": lines}


@route("POST", "/v1/validate/{m}")
def validate(sup: CommandPort, req: Request, p: dict[str, str]) -> tuple[int, Any]:
    name = sup.resolve(p["m"])
    body = req.json()
    levels = body.get("levels", [1, 2])
    if (not isinstance(levels, list) or not levels
            or any(lv not in (1, 2, 3) or isinstance(lv, bool) for lv in levels)):
        raise ApiError("bad_request", "levels must be a non-empty list of 1, 2, 3", model=name)
    verbose = body.get("verbose", False)
    if not isinstance(verbose, bool):
        raise ApiError("bad_request", "verbose must be true or false", model=name)
    return 200, sup.validate(name, list(levels), verbose)


# ---------------------------------------------------------------------------
# Leases


@route("POST", "/v1/leases")
def acquire(sup: CommandPort, req: Request, _p: dict[str, str]) -> tuple[int, Any]:
    body = req.json()
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError("bad_request", "body must be {\"model\": \"<name>\"}")
    name = sup.resolve(model)
    try:
        lease = sup.leases.acquire(name, req.peer_pid, sup.config.policy.request_timeout_secs,
                                   cancelled=req.cancelled)
    except ApiError as exc:
        sup.metrics.refused(name, exc.code)
        raise
    sup.metrics.granted(name, lease.waited_s)
    upstream, served = sup.leases.upstream(name)
    return 200, {"lease_id": lease.lease_id, "model": name, "upstream": upstream,
                 "served_model_name": served, "waited_ms": round(lease.waited_s * 1000, 3),
                 "switched": lease.switched}


@route("POST", "/v1/leases/{lease}/release")
def release(sup: CommandPort, req: Request, p: dict[str, str]) -> tuple[int, Any]:
    body = req.json()
    lease = sup.leases.release(p["lease"])
    if lease is not None:
        sup.metrics.released(lease.model, body.get("status"), body.get("duration_ms"))
        return 200, {"released": True}
    # Already revoked (drain timeout, max_lease_secs, dead child): say why.
    return 200, {"released": True, "revoked": sup.leases.revoked_reason(p["lease"]) or ""}


@route("GET", "/v1/leases")
def list_leases(sup: CommandPort, req: Request, _p: dict[str, str]) -> tuple[int, Any]:
    now = time.monotonic()
    return 200, {"leases": [
        {"lease_id": lease.lease_id, "model": lease.model, "pid": lease.pid,
         "age_s": round(now - lease.granted_at, 3)}
        for lease in sup.leases.leases()]}


_ACQUIRE = next(r for r in ROUTES if r.handler is acquire)
_RELEASE = next(r for r in ROUTES if r.handler is release)
