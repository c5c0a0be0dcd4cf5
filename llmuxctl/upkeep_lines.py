"""``llmuxctl status`` lines for upkeep and host memory: prewarm progress, keep-active
models, the host-RAM budget and the last memory-aware sleeping decisions.

Pure functions of the ``/v1/status`` document (docs/interfaces.md §5); a daemon
without these parts (older, or a filtered status) gives no lines.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RECENT = 3


def _gib(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "?"
    return f"{value / (1 << 30):.1f} GiB"


def upkeep_lines(status: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    upkeep = status.get("upkeep")
    if isinstance(upkeep, Mapping):
        prewarm = upkeep.get("prewarm")
        if isinstance(prewarm, Mapping):
            notes = prewarm.get("models")
            parts = [f"{n} {note}" for n, note in notes.items()] \
                if isinstance(notes, Mapping) else []
            parts += [f"{n} pending" for n in prewarm.get("pending") or []
                      if not (isinstance(notes, Mapping) and n in notes)]
            if parts:
                lines.append("prewarm: " + "; ".join(parts))
        keep = upkeep.get("keep_active")
        if keep:
            lines.append("keep active: " + ", ".join(str(n) for n in keep))
    memory = status.get("memory")
    if isinstance(memory, Mapping) and memory.get("limit_bytes") is not None:
        lines.append(f"host RAM: models hold {_gib(memory.get('models_bytes'))} of "
                     f"{_gib(memory.get('limit_bytes'))} ({memory.get('limit_how')}; "
                     f"{_gib(memory.get('host_available_bytes'))} available)")
        for action in list(memory.get("recent_actions") or [])[-RECENT:]:
            if isinstance(action, Mapping):
                lines.append(f"memory: {action.get('action')} {action.get('model')}: "
                             f"{action.get('why')}")
    return lines
