"""Per-model readiness for load balancers: ``GET /v1/models/{model}/ready``.

A fleet router (HAProxy, a Kubernetes Service) health-checks every model on every
box every second or two. Each check must be cheap and must not disturb the box: no
lease (a lease on a sleeping model would wake it — exactly what routing to the
awake replica is meant to avoid), and no round trip to the daemon per check. So
each worker keeps the daemon's model states in a ``StateCache`` refreshed from
``GET /v1/status`` at most once per ``MAX_AGE`` (one refresh at a time; the other
threads wait for it rather than asking too), and answers from it.

The contract (docs/interfaces.md, docs/fleet.md): 200 ``{"model", "state":
"active", "ready": true}`` when the model is ACTIVE; 503 with the state otherwise
(``unavailable`` when the daemon does not answer); 404 in the OpenAI error shape
for a name that is neither a model nor an alias. No API key: the answer is only a
state. ``{model}`` may contain '/' (``Qwen/Qwen3-14B``), percent-encoded or not.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import falcon

from llmuxd.proxy.errors import OpenAIError
from llmuxd.proxy.lease_client import DaemonError, DaemonUnavailable

MAX_AGE = 1.0
ACTIVE = "active"
# The state named when the daemon itself does not answer: nothing can be served.
UNAVAILABLE = "unavailable"

_READY_PATH = re.compile(r"/v1/models/.+/ready")


def is_ready_path(path: str) -> bool:
    """True for a readiness check's path (exempt from API keys: it tells only a state)."""
    return _READY_PATH.fullmatch(path) is not None


@dataclass(frozen=True)
class Snapshot:
    """The daemon's answer at one moment: model states and which name means which model."""

    taken: float
    states: Mapping[str, str] = field(default_factory=dict)
    names: Mapping[str, str] = field(default_factory=dict)  # model or alias -> model
    reachable: bool = True


def snapshot_of(status: Mapping[str, Any], taken: float) -> Snapshot:
    """Read states and aliases out of the control API's ``GET /v1/status`` body."""
    states: dict[str, str] = {}
    names: dict[str, str] = {}
    models = status.get("models") or {}
    for name, info in models.items():
        states[name] = str(info.get("state") or "unknown")
        names[name] = name
        for alias in info.get("aliases") or ():
            names.setdefault(str(alias), name)
    return Snapshot(taken, states, names)


@dataclass(frozen=True)
class Readiness:
    model: str
    state: str

    @property
    def ready(self) -> bool:
        return self.state == ACTIVE

    def body(self) -> dict[str, Any]:
        return {"model": self.model, "state": self.state, "ready": self.ready}


class StateCache:
    """Model states no older than ``max_age``, fetched by one thread at a time.

    ``fetch`` returns the daemon's status (raises DaemonError/DaemonUnavailable);
    ``configured`` lists the names the config knows, used only while the daemon is
    unreachable so a known model reads ``unavailable`` (503), not unknown (404).
    A failed fetch is cached like a good one: a dead daemon is asked once per
    ``max_age`` per worker, not once per check.
    """

    def __init__(self, fetch: Callable[[], Mapping[str, Any]], configured: Iterable[str],
                 max_age: float = MAX_AGE, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.fetch = fetch
        self.configured = frozenset(configured)
        self.max_age = max_age
        self.clock = clock
        self._lock = threading.Lock()
        self._snap: Snapshot | None = None

    def snapshot(self) -> Snapshot:
        snap = self._snap
        if snap is not None and self.clock() - snap.taken < self.max_age:
            return snap
        with self._lock:
            snap = self._snap  # another thread may have refreshed while we waited
            if snap is not None and self.clock() - snap.taken < self.max_age:
                return snap
            try:
                snap = snapshot_of(self.fetch(), self.clock())
            except (DaemonError, DaemonUnavailable):
                snap = Snapshot(self.clock(), reachable=False)
            self._snap = snap
            return snap

    def lookup(self, name: str) -> Readiness | None:
        """The readiness of a model or alias; None when no such name exists."""
        snap = self.snapshot()
        if not snap.reachable:
            return Readiness(name, UNAVAILABLE) if name in self.configured else None
        model = snap.names.get(name)
        if model is None:
            return None
        return Readiness(name, snap.states.get(model, "unknown"))


class ReadinessResource:
    """``/v1/models/{model_id}/{rest:path}``: readiness when it ends in ``/ready``.

    Falcon splits the path on '/' before routing (gunicorn has already decoded
    ``%2F``), so a name with slashes arrives as ``model_id`` plus the front of
    ``rest``; any other path below a model (``GET /v1/models/Qwen/Qwen3-14B``) is
    the model's own entry, handed to ``model_info``.
    """

    def __init__(self, cache: StateCache,
                 model_info: Callable[[falcon.Request, falcon.Response, str], None]) -> None:
        self.cache = cache
        self.model_info = model_info

    def on_get(self, req: falcon.Request, resp: falcon.Response, model_id: str,
               rest: str) -> None:
        full = f"{model_id}/{rest}"
        if not is_ready_path(f"/v1/models/{full}"):
            self.model_info(req, resp, full)
            return
        name = full[: -len("/ready")]
        found = self.cache.lookup(name)
        if found is None:
            raise OpenAIError(404, f"The model '{name}' does not exist",
                              "invalid_request_error", "model_not_found", "model")
        resp.status = 200 if found.ready else 503
        resp.set_header("Cache-Control", "no-store")
        resp.media = found.body()

    def on_head(self, req: falcon.Request, resp: falcon.Response, model_id: str,
                rest: str) -> None:
        self.on_get(req, resp, model_id, rest)
        resp.media = None
