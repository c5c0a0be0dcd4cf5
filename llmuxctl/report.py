"""The validate answer printed as the seed's table, by llmuxd's own formatter.

Why rebuild the report from JSON instead of formatting it here: ``llmuxd --validate``
(standalone) and ``llmuxctl validate`` (through the daemon) must print the very same
table, so both go through ``llmuxd.validate.format_table``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from llmuxctl.errors import OperationFailed


def report_from_dict(data: Mapping[str, Any]) -> Any:
    """A ``ValidateReport`` from its ``to_dict()`` form (unknown keys ignored)."""
    from llmuxd.validate import ValidateReport, ValidateRow

    fields = {f.name for f in dataclasses.fields(ValidateRow)}
    rows = []
    for raw in data.get("rows") or []:
        if not isinstance(raw, Mapping):
            continue
        row = {k: v for k, v in raw.items() if k in fields}
        by_gpu = row.get("gpu_after_by_gpu")
        if isinstance(by_gpu, Mapping):
            row["gpu_after_by_gpu"] = {int(k): v for k, v in by_gpu.items()}
        rows.append(ValidateRow(**row))
    return ValidateReport(model=str(data.get("model", "")), probe=str(data.get("probe", "")),
                          levels=list(data.get("levels") or []), rows=rows,
                          baseline=data.get("baseline"), error=str(data.get("error") or ""),
                          left_awake=bool(data.get("left_awake")))


def render_validate(data: Any, *, verbose: bool = False) -> list[str]:
    """The step lines (with --verbose), then the table and the Result line."""
    from llmuxd.validate import format_table

    if not isinstance(data, Mapping) or not isinstance(data.get("rows"), list):
        raise OperationFailed("llmuxd answered validate without a report", code="bad_answer")
    lines: list[str] = []
    if verbose:
        lines += [str(step) for step in data.get("steps") or []]
        if lines:
            lines.append("")
    try:
        lines += format_table(report_from_dict(data)).splitlines()
    except (TypeError, ValueError) as exc:
        raise OperationFailed(f"cannot read llmuxd's validate report: {exc}",
                              code="bad_answer") from None
    return lines


def validate_passed(data: Any) -> bool:
    return isinstance(data, Mapping) and data.get("passed") is True
