"""llmuxctl's failures: one class per exit code, each rendered as one line with a hint.

Why classes keyed to exit codes: scripts branch on the exit status (docs/interfaces.md
section 7), so every failure path must pick exactly one code, and ``cli.main`` must be
able to print any of them without a traceback.
"""

from __future__ import annotations

import re
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1         # the daemon refused or the operation failed
EXIT_USAGE = 2          # bad command line or unreadable config (argparse uses 2 too)
EXIT_UNREACHABLE = 3    # no daemon on the socket
EXIT_PERMISSION = 4     # the socket or the daemon refused us
EXIT_INTERRUPTED = 130  # Ctrl-C while waiting (the shell's convention for SIGINT)

DEFAULT_SOCKET = "/run/llmux/llmuxd.sock"
DEFAULT_CONFIG = "/etc/llmux.toml"


class CtlError(Exception):
    """A failure the user sees as ``llmuxctl: <message>`` and an exit code."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, code: str = "", detail: dict[str, Any] | None = None,
                 full_message: str = ""):
        super().__init__(message)
        self.message = message
        self.code = code or type(self).__name__
        self.detail = detail or {}
        self.full_message = full_message or message  # the daemon's own words, for --json

    def line(self) -> str:
        return f"llmuxctl: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """The error for ``--json`` output, in the daemon's error shape plus the exit code."""
        err = {"code": self.code, "message": self.full_message, "exit_code": self.exit_code}
        err.update({k: v for k, v in self.detail.items() if k not in err})
        return {"error": err}


class OperationFailed(CtlError):
    """The daemon answered, but said no (unknown model, conflict, failed start, ...)."""

    exit_code = EXIT_FAILED


class UsageError(CtlError):
    """The command line or the config file given with -c is unusable."""

    exit_code = EXIT_USAGE


class DaemonUnreachable(CtlError):
    """Nothing answers on the socket (not running, stale socket, hung, or went away)."""

    exit_code = EXIT_UNREACHABLE


class PermissionDenied(CtlError):
    """The socket file (mode 0660) or the daemon's peer check refused this user."""

    exit_code = EXIT_PERMISSION


class Interrupted(CtlError):
    """Ctrl-C while waiting for a long operation; the daemon carries on with it."""

    exit_code = EXIT_INTERRUPTED


_LOG_TAIL_INTRO = re.compile(r"[;:,]?\s*(the )?last (\d+ )?(log )?lines( of [^:]*)?:?\s*$")


def first_line(message: str) -> str:
    """The first line of a daemon message, without the intro of a log tail after it.

    llmuxd puts the last lines of a child's log into start errors; on a terminal
    that is a wall of text, so the CLI shows one line and points at ``llmuxctl logs``.
    """
    lines = message.strip().splitlines() or [""]
    return _LOG_TAIL_INTRO.sub("", lines[0]).rstrip(" ;:,") or lines[0]
