"""HTTP to one vLLM child: health, sleep, the wake sequences, warm-up, probe request.

Why stdlib ``http.client`` with a fresh connection per call: vLLM closes the
connection after a 500, and a reused keep-alive socket would turn the next call
into a confusing reset. Every call has a timeout; a sleep or wake is bounded as a
whole, including its confirmation through ``GET /is_sleeping`` (older vLLM answers
``/sleep`` with an empty 200 before the work is done). See docs VLLM_API.md.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

PROBE_PROMPT = "What is 2+2? Reply with just the number."
_EXCERPT = 300


class VllmError(Exception):
    """Any failure talking to a vLLM child; the message is meant for an operator."""


class OpTimeout(VllmError):
    """An operation did not finish before its deadline (a hung child)."""


class ChildExited(VllmError):
    """The child died while we waited for it."""


class Unreachable(VllmError):
    """Nothing answers on the child's port (not started yet, or dead)."""


class SleepFailed(VllmError):
    """``/sleep`` answered with an error, or the child cannot be reached."""


class WakeFailed(VllmError):
    """A step of the wake sequence failed; ``step`` names it."""

    def __init__(self, message: str, step: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.status = status


class RequestFailed(VllmError):
    """A completion (warm-up or probe) failed."""


@dataclass(frozen=True)
class Response:
    """One HTTP answer, fully read."""

    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8")) if self.body.strip() else None

    def excerpt(self) -> str:
        text = self.body.decode("utf-8", "replace").strip()
        return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "..."


@dataclass(frozen=True)
class Sample:
    """One Prometheus sample: ``name{labels} value``."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    value: float = 0.0


class _UnixConnection(http.client.HTTPConnection):
    """http.client over the child's Unix socket (vLLM ``--uds``)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class VllmClient:
    """Talks to the vLLM child serving ``served_model_name``.

    On ``127.0.0.1:<port>`` (TCP), or on the Unix socket ``uds`` when given (the
    default transport: a socket in a 0700 directory no other user can reach).
    """

    def __init__(self, port: int, served_model_name: str, host: str = "127.0.0.1",
                 uds: str = "") -> None:
        self.host = host
        self.port = port
        self.uds = uds
        self.served_model_name = served_model_name

    @classmethod
    def for_model(cls, model: Any) -> VllmClient:
        """The client of a ModelConfig's child, on the transport the config chose."""
        uds = model.socket_path if model.transport == "unix" else ""
        return cls(model.port, model.name, uds=uds)

    @property
    def base_url(self) -> str:
        return f"unix:{self.uds}" if self.uds else f"http://{self.host}:{self.port}"

    @property
    def where(self) -> str:
        """Where the child listens, for messages."""
        return self.uds if self.uds else f"port {self.port}"

    # -- transport -------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None,
                timeout: float = 10.0) -> Response:
        """One request on a fresh connection; raises OpTimeout / Unreachable / VllmError."""
        timeout = max(timeout, 0.001)
        conn: http.client.HTTPConnection
        if self.uds:
            conn = _UnixConnection(self.uds, timeout)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        headers = {"Connection": "close"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        what = f"{method} {path}"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return Response(resp.status, resp.read())
        except TimeoutError:
            raise OpTimeout(f"{what} on {self.where}: no answer within "
                            f"{timeout:.1f}s") from None
        except (ConnectionRefusedError, FileNotFoundError):
            shown = self.uds or f"127.0.0.1:{self.port}"
            raise Unreachable(f"{what}: nothing listens on {shown}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise VllmError(f"{what} on {self.where} failed: "
                            f"{type(exc).__name__}: {exc}") from None
        finally:
            conn.close()

    # -- health ----------------------------------------------------------------

    def health(self, timeout: float = 5.0) -> bool:
        """True when ``GET /health`` answers 200 (it stays 200 while asleep)."""
        try:
            return self.request("GET", "/health", timeout=timeout).status == 200
        except VllmError:
            return False

    def wait_healthy(self, deadline: float, is_alive: Callable[[], bool],
                     interval: float = 0.5) -> None:
        """Poll /health until 200; ``deadline`` is a ``time.monotonic()`` value.

        Raises ChildExited as soon as ``is_alive()`` is false (an early exit is a
        failed start, no need to wait out a 30-minute startup timeout), OpTimeout at
        the deadline.
        """
        while True:
            if not is_alive():
                raise ChildExited(f"the child on {self.where} exited during startup")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OpTimeout(f"{self.where}: /health not ready before the "
                                "startup timeout")
            if self.health(timeout=min(5.0, remaining)):
                return
            if not is_alive():
                raise ChildExited(f"the child on {self.where} exited during startup")
            time.sleep(max(0.0, min(interval, deadline - time.monotonic())))

    # -- sleep / wake ----------------------------------------------------------

    def is_sleeping(self, timeout: float = 5.0) -> bool:
        """``GET /is_sleeping``; raises VllmError when the answer is not usable."""
        resp = self.request("GET", "/is_sleeping", timeout=timeout)
        if resp.status != 200:
            raise VllmError(f"GET /is_sleeping answered {resp.status}: {resp.excerpt()}")
        try:
            value = resp.json()["is_sleeping"]
        except (ValueError, TypeError, KeyError):
            raise VllmError(f"GET /is_sleeping: unexpected body {resp.excerpt()!r}") from None
        if not isinstance(value, bool):
            raise VllmError(f"GET /is_sleeping: unexpected body {resp.excerpt()!r}")
        return value

    def sleep(self, level: int, timeout: float) -> None:
        """``POST /sleep?level=N``, then confirm ``/is_sleeping`` is true, all within timeout."""
        if level not in (0, 1, 2):
            raise ValueError(f"HTTP sleep levels are 0, 1 and 2 (level 3 is a stop), not {level}")
        deadline = time.monotonic() + timeout
        path = f"/sleep?level={level}"
        try:
            resp = self.request("POST", path, timeout=_left(deadline))
        except OpTimeout:
            raise OpTimeout(f"POST {path}: no answer within {timeout:.1f}s") from None
        except VllmError as exc:
            raise SleepFailed(f"POST {path} failed: {exc}") from None
        if resp.status != 200:
            raise SleepFailed(f"POST {path} answered {resp.status}: {resp.excerpt()}")
        self._confirm(sleeping=True, deadline=deadline, what=f"sleep level {level}")

    def wake(self, level: int, timeout: float) -> None:
        """Wake from ``level`` with the right sequence, confirm, all within timeout.

        L1 (and 0): ``POST /wake_up``. L2: weights → ``reload_weights`` → KV cache →
        reset the prefix cache; without the reload an L2 wake serves garbage, so a
        failed reload raises (the caller must then stop the model, never serve it).
        """
        deadline = time.monotonic() + timeout
        if level == 2:
            self._wake_step("wake weights", "POST", "/wake_up?tags=weights", None, deadline)
            self._wake_step("reload weights", "POST", "/collective_rpc",
                            {"method": "reload_weights"}, deadline)
            self._wake_step("wake kv_cache", "POST", "/wake_up?tags=kv_cache", None, deadline)
            self._wake_step("reset prefix cache", "POST", "/reset_prefix_cache", None,
                            deadline)
        elif level in (0, 1):
            self._wake_step("wake", "POST", "/wake_up", None, deadline)
        else:
            raise ValueError(f"wake levels are 0, 1 and 2 (level 3 is a cold start), "
                             f"not {level}")
        self._confirm(sleeping=False, deadline=deadline, what=f"wake from level {level}")

    def _wake_step(self, step: str, method: str, path: str, body: Any,
                   deadline: float) -> None:
        try:
            resp = self.request(method, path, body, timeout=_left(deadline))
        except OpTimeout:
            raise OpTimeout(f"wake step '{step}' ({method} {path}) did not answer "
                            "before the wake timeout") from None
        except VllmError as exc:
            raise WakeFailed(f"wake step '{step}' ({method} {path}) failed: {exc}",
                             step=step) from None
        if resp.status != 200:
            raise WakeFailed(f"wake step '{step}' ({method} {path}) answered "
                             f"{resp.status}: {resp.excerpt()}", step=step,
                             status=resp.status)

    def _confirm(self, sleeping: bool, deadline: float, what: str) -> None:
        """Poll ``/is_sleeping`` until it says ``sleeping`` or the deadline passes."""
        last = "no answer"
        while True:
            try:
                if self.is_sleeping(timeout=min(5.0, _left(deadline))) == sleeping:
                    return
                last = f"is_sleeping is still {not sleeping}"
            except OpTimeout:
                last = "GET /is_sleeping did not answer"
            except VllmError as exc:
                if isinstance(exc, Unreachable):
                    raise (SleepFailed if sleeping else WakeFailed)(
                        f"{what}: the child stopped answering: {exc}") from None
                last = str(exc)
            if time.monotonic() >= deadline:
                raise OpTimeout(f"{what} not confirmed before the timeout ({last})")
            time.sleep(min(0.1, _left(deadline)))

    # -- requests --------------------------------------------------------------

    def warmup(self, timeout: float = 60.0) -> None:
        """A 1-token completion: the first request after a wake is slow, pay it here.

        An embedding (pooling) model serves no /v1/completions (404), so it is
        warmed with a one-word embedding instead; any other answer but 200 fails.
        """
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {"model": self.served_model_name, "prompt": "Hi",
                                "max_tokens": 1, "temperature": 0}
        resp = self.request("POST", "/v1/completions", body, timeout=timeout)
        what = "completion"
        if resp.status == 404:
            body = {"model": self.served_model_name, "input": "Hi"}
            left = max(1.0, deadline - time.monotonic())
            resp = self.request("POST", "/v1/embeddings", body, timeout=left)
            what = "embedding"
        if resp.status != 200:
            raise RequestFailed(f"warm-up {what} answered {resp.status}: {resp.excerpt()}")

    def probe_completion(self, timeout: float = 60.0) -> str:
        """The deterministic request of validate; returns the answer's text."""
        body = {"model": self.served_model_name,
                "messages": [{"role": "user", "content": PROBE_PROMPT}],
                "temperature": 0, "seed": 42, "max_tokens": 10}
        resp = self.request("POST", "/v1/chat/completions", body, timeout=timeout)
        if resp.status != 200:
            raise RequestFailed(f"probe completion answered {resp.status}: {resp.excerpt()}")
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, TypeError, KeyError, IndexError):
            raise RequestFailed(f"probe completion: unexpected body {resp.excerpt()!r}"
                                ) from None
        return content if isinstance(content, str) else json.dumps(content)

    # -- metrics ---------------------------------------------------------------

    def metrics_samples(self, timeout: float = 5.0) -> list[Sample]:
        """Every sample of ``GET /metrics``."""
        resp = self.request("GET", "/metrics", timeout=timeout)
        if resp.status != 200:
            raise VllmError(f"GET /metrics answered {resp.status}: {resp.excerpt()}")
        return parse_prometheus(resp.body.decode("utf-8", "replace"))

    def metrics(self, timeout: float = 5.0) -> dict[str, float]:
        """Metric name → value summed over its label sets."""
        return sum_by_name(self.metrics_samples(timeout))

    def sleep_operation_seconds(self, operation: str, timeout: float = 5.0) -> float | None:
        """``vllm:sleep_mode_operation_duration_seconds_sum{operation=...}`` (None if absent)."""
        return sleep_operation_seconds(self.metrics_samples(timeout), operation)


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


# ---------------------------------------------------------------------------
# Prometheus text


def parse_prometheus(text: str) -> list[Sample]:
    """Every sample of a Prometheus text page, by prometheus_client's own parser.

    Why not by hand: the format splits lines on ``\\n`` only and escapes label
    values; a hand parser got label values with a carriage return or U+2028 wrong
    (``str.splitlines`` splits there). A page the parser rejects is a VllmError.
    """
    try:
        return [Sample(s.name, dict(s.labels), float(s.value))
                for family in text_string_to_metric_families(text)
                for s in family.samples]
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise VllmError(f"GET /metrics: not Prometheus text: {exc}") from None


def sum_by_name(samples: list[Sample]) -> dict[str, float]:
    """Metric name → sum of its samples over all label sets (NaN samples skipped)."""
    totals: dict[str, float] = {}
    for s in samples:
        if math.isnan(s.value):
            continue
        totals[s.name] = totals.get(s.name, 0.0) + s.value
    return totals


def sleep_operation_seconds(samples: list[Sample], operation: str) -> float | None:
    """Total seconds vLLM reports for one sleep-mode operation ("sleep", "wake_up")."""
    found = [s.value for s in samples
             if s.name == "vllm:sleep_mode_operation_duration_seconds_sum"
             and s.labels.get("operation") == operation]
    return sum(found) if found else None
