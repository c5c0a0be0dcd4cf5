"""structlog for llmuxd: JSON lines to stdout (journald keeps them), console on a TTY.

stdlib logging (gunicorn is separate; urllib3, prometheus_client, ours) is routed
through the same processors with ``ProcessorFormatter``, so every line of the
daemon has one shape with an ISO UTC timestamp and the level.

Under systemd (``JOURNAL_STREAM`` names the stream we write to) every line starts
with its syslog priority, ``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>``
debug: journald strips the prefix and files the line at that priority
(SyslogLevelPrefix=yes, the default), so ``journalctl -u llmux -p warning`` shows
warnings and errors only. Without it every line landed at one priority.
The journal API (sd_journal_send) would need a C binding; the prefix needs nothing.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error")
# syslog(3) priorities by stdlib level number (CRITICAL -> crit).
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
              logging.CRITICAL: 2}


def journal_stream(stream: Any) -> bool:
    """True when ``stream`` is the journald stream systemd gave us.

    systemd sets JOURNAL_STREAM=DEV:INODE of the stdout/stderr it connected; a
    child that inherits the variable but writes elsewhere must not prefix, so the
    stream's own device and inode are compared (as sd_journal_stream_fd(3) advises).
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):   # io.UnsupportedOperation included
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class PriorityFormatter(structlog.stdlib.ProcessorFormatter):
    """ProcessorFormatter that starts each line with its ``<N>`` syslog priority."""

    def format(self, record: logging.LogRecord) -> str:
        prio = PRIORITIES.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{prio}>" + super().format(record)


def setup_logging(level: str = "info", json_lines: bool | None = None,
                  stream: Any = None) -> None:
    """Configure structlog and stdlib logging once for the process."""
    stream = stream or sys.stdout
    if json_lines is None:
        json_lines = not (hasattr(stream, "isatty") and stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (structlog.processors.JSONRenderer() if json_lines
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    cls = PriorityFormatter if journal_stream(stream) else structlog.stdlib.ProcessorFormatter
    formatter = cls(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
