"""structlog for llmuxd: JSON lines to stdout (journald keeps them), console on a TTY.

stdlib logging (gunicorn is separate; urllib3, prometheus_client, ours) is routed
through the same processors with ``ProcessorFormatter``, so every line of the
daemon has one shape with an ISO UTC timestamp and the level.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error")


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
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
