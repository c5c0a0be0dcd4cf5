"""The validate answer printed as the seed's table, by llmuxd's own formatter.

Why rebuild the report from JSON instead of formatting it here: ``llmuxd --validate``
(standalone) and ``llmuxctl validate`` (through the daemon) must print the very same
table, so both go through ``llmuxd.validate.format_table``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmuxctl.errors import OperationFailed


def render_validate(data: Any, *, verbose: bool = False) -> list[str]:
    """The step lines (with --verbose), then the table and the Result line."""
    from llmuxd.validate import ValidateReport, format_table

    if not isinstance(data, Mapping) or not isinstance(data.get("rows"), list):
        raise OperationFailed("llmuxd answered validate without a report", code="bad_answer")
    lines: list[str] = []
    if verbose:
        lines += [str(step) for step in data.get("steps") or []]
        if lines:
            lines.append("")
    try:
        lines += format_table(ValidateReport.from_dict(dict(data))).splitlines()
    except (TypeError, ValueError, AttributeError) as exc:
        raise OperationFailed(f"cannot read llmuxd's validate report: {exc}",
                              code="bad_answer") from None
    return lines


def validate_passed(data: Any) -> bool:
    return isinstance(data, Mapping) and data.get("passed") is True
