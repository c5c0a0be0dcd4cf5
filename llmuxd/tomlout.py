"""Writing a config tree back as TOML (stdlib reads TOML but cannot write it).

Used by ``llmuxd --check-config`` to show the resolved config, and by the test
helpers to write configs, so both speak the layout the loader reads: top-level
scalars, then tables, then one ``[models.NAME]`` table per model.
"""

from __future__ import annotations

import json
from typing import Any


def toml_key(name: str) -> str:
    """A bare key where TOML allows one, else a quoted one."""
    ok = name and all(c.isalnum() or c in "-_" for c in name)
    return name if ok else json.dumps(name)


def toml_value(value: Any) -> str:
    """One value; JSON's string escapes are valid TOML basic strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def dumps(data: dict[str, Any]) -> str:
    """A config dict as TOML text (``models`` as one table per model)."""
    lines: list[str] = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for key, value in data.items():
        if key not in tables:
            lines.append(f"{key} = {toml_value(value)}")
    for name, table in tables.items():
        if name == "models":
            continue
        lines += ["", f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    for name, table in tables.get("models", {}).items():
        lines += ["", f"[models.{toml_key(name)}]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
