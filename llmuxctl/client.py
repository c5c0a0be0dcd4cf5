"""HTTP+JSON to llmuxd over its Unix socket, with every failure turned into a CtlError.

Why all the error archaeology: requests wraps the socket's OSError two or three
levels deep, and the user must learn *which* of "not running", "stale socket",
"not allowed" or "hung" happened, each with its own exit code and hint.
"""

from __future__ import annotations

import errno
import grp
import os
import stat
from typing import Any
from urllib.parse import quote

import requests
import requests_unixsocket

from llmuxctl.errors import (
    CtlError,
    DaemonUnreachable,
    OperationFailed,
    PermissionDenied,
    first_line,
)

SHORT_TIMEOUT = 30.0      # a status/GET answer; generous for a loaded box
CONNECT_TIMEOUT = 10.0
START_HINT = "start it with: systemctl start llmux"

# Hints appended to the daemon's own message, by error code.
_HINTS = {
    "model_not_found": "see the models with: llmuxctl status",
    "model_failed": "see why with: llmuxctl logs {model}",
    "conflict": "see its state with: llmuxctl status {model}",
    "timeout": "see its state with: llmuxctl status {model}",
    "shutting_down": "llmuxd is stopping; start it again with: systemctl start llmux",
    "internal": "this is a bug in llmuxd; see: journalctl -u llmux",
}


class AnswerTimeout(DaemonUnreachable):
    """The daemon took the request but did not answer in time (long operations catch it)."""


def socket_group(path: str) -> str:
    """The name of the group that owns the socket (the group to join), or 'llmux'."""
    try:
        return grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError):
        return "llmux"


def permission_denied(path: str) -> PermissionDenied:
    group = socket_group(path)
    return PermissionDenied(
        f"permission denied on {path}: add yourself to group {group} (then log in again)",
        code="permission_denied",
    )


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError buried in a requests/urllib3 exception chain, if any."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen or not isinstance(cur, BaseException):
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        stack.extend([cur.__cause__, cur.__context__, getattr(cur, "reason", None)])
        stack.extend(a for a in cur.args if isinstance(a, BaseException))
    return None


def diagnose_connect(path: str, exc: BaseException | None = None) -> CtlError:
    """Why connecting to the socket failed, from the errno and then from the file itself."""
    oserr = _os_error(exc) if exc is not None else None
    code = oserr.errno if oserr is not None else None
    if code in (errno.EACCES, errno.EPERM):
        return permission_denied(path)
    try:
        st = os.stat(path)
    except PermissionError:
        return permission_denied(path)
    except FileNotFoundError:
        return DaemonUnreachable(
            f"llmuxd is not running (no socket at {path}); {START_HINT}", code="unreachable")
    except OSError as err:
        return DaemonUnreachable(f"cannot reach {path}: {err.strerror}; {START_HINT}",
                                 code="unreachable")
    if not stat.S_ISSOCK(st.st_mode):
        return DaemonUnreachable(
            f"{path} is not a socket; is this the right path? (set it with -s or -c)",
            code="unreachable")
    if not os.access(path, os.R_OK | os.W_OK):
        return permission_denied(path)
    if code == errno.ECONNREFUSED:
        return DaemonUnreachable(
            f"llmuxd is not running (stale socket at {path}, nothing listens); {START_HINT}",
            code="unreachable")
    reason = oserr.strerror if oserr is not None and oserr.strerror else str(exc)
    return DaemonUnreachable(f"cannot reach llmuxd on {path}: {reason}; {START_HINT}",
                             code="unreachable")


def daemon_error(path: str, status: int, body: Any) -> CtlError:
    """A CtlError from the daemon's error shape ``{"error": {"code", "message", ...}}``."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return OperationFailed(f"llmuxd answered HTTP {status} without an error body",
                               code="bad_answer")
    code = str(err.get("code") or "error")
    message = str(err.get("message") or f"HTTP {status}")
    if code == "permission_denied" or status == 403:
        return permission_denied(path)
    model = err.get("model")
    hint = _HINTS.get(code, "")
    first = first_line(message)
    if first != message.strip() and model and not hint:
        hint = "see why with: llmuxctl logs {model}"  # the rest was a log tail
    if "{model}" in hint:
        hint = hint.format(model=model) if model else hint.replace(" {model}", "")
    line = f"{first}; {hint}" if hint and hint not in first else first
    return OperationFailed(line, code=code, full_message=message,
                           detail={k: v for k, v in err.items() if k not in ("code", "message")})


class ControlClient:
    """One llmuxd control socket. Methods return the decoded JSON or raise CtlError."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._base = "http+unix://" + quote(socket_path, safe="")
        self._session = requests_unixsocket.Session()
        self._session.trust_env = False  # no proxies or .netrc for a local socket

    def close(self) -> None:
        self._session.close()

    def request(self, method: str, path: str, *, body: Any = None,
                params: dict[str, Any] | None = None,
                timeout: float | None = SHORT_TIMEOUT) -> tuple[int, Any]:
        """Send one request; (status, JSON body) for any 2xx, CtlError for anything else.

        ``timeout`` bounds the wait for the answer (None: the caller bounds it).
        """
        url = self._base + path
        try:
            resp = self._session.request(method, url, json=body, params=params,
                                         timeout=(CONNECT_TIMEOUT, timeout))
        except requests.exceptions.ConnectTimeout as exc:
            raise DaemonUnreachable(
                f"llmuxd on {self.socket_path} did not accept a connection within "
                f"{CONNECT_TIMEOUT:g}s; is it hung? see: journalctl -u llmux",
                code="unreachable") from exc
        except requests.exceptions.ReadTimeout as exc:
            raise AnswerTimeout(
                f"llmuxd on {self.socket_path} did not answer within {timeout:g}s; "
                "is it hung? see: journalctl -u llmux", code="unreachable") from exc
        except requests.exceptions.ConnectionError as exc:
            oserr = _os_error(exc)
            closed = (oserr.errno in (errno.ECONNRESET, errno.EPIPE) if oserr is not None
                      else "RemoteDisconnected" in repr(exc))
            if closed:
                raise DaemonUnreachable(
                    f"llmuxd closed the connection on {self.socket_path} (did it stop?); "
                    "see: journalctl -u llmux", code="unreachable") from exc
            raise diagnose_connect(self.socket_path, exc) from exc
        except requests.exceptions.RequestException as exc:
            raise DaemonUnreachable(f"cannot talk to llmuxd on {self.socket_path}: {exc}",
                                    code="unreachable") from exc
        try:
            data = resp.json()
        except ValueError:
            data = None
        if 200 <= resp.status_code < 300:
            if data is None:
                raise OperationFailed(
                    f"llmuxd answered {method} {path} with HTTP {resp.status_code} and no JSON",
                    code="bad_answer")
            return resp.status_code, data
        raise daemon_error(self.socket_path, resp.status_code, data)

    def get(self, path: str, params: dict[str, Any] | None = None,
            timeout: float | None = SHORT_TIMEOUT) -> Any:
        return self.request("GET", path, params=params, timeout=timeout)[1]

    def post(self, path: str, body: Any = None, params: dict[str, Any] | None = None,
             timeout: float | None = SHORT_TIMEOUT) -> Any:
        return self.request("POST", path, body=body, params=params, timeout=timeout)[1]


def model_path(model: str, action: str = "") -> str:
    """The route of one model, its name quoted so that '/' or '?' cannot escape it."""
    base = "/v1/models/" + quote(model, safe="")
    return f"{base}/{action}" if action else base
