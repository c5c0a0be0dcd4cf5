"""Writing a config tree back as TOML (stdlib reads TOML but cannot write it).

Used by ``llmuxd --check-config`` to show the resolved config, and by the test
helpers to write configs, so both speak the layout the loader reads: top-level
scalars, then tables, then one ``[models.NAME]`` table per model.

Why tomli-w rather than our own writer: a hand-made one wrote ``[models.café]``
(a bare key TOML does not allow) and JSON's surrogate-pair escapes for emoji, both
of which ``tomllib`` rejects. tomli-w quotes and escapes by the TOML spec.
"""

from __future__ import annotations

from typing import Any

import tomli_w


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (what tomli-w and tomllib agree on)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def dumps(data: dict[str, Any]) -> str:
    """A config dict as TOML text (``models`` as one table per model)."""
    plain = _plain(data)
    order = sorted(plain, key=lambda k: (isinstance(plain[k], dict), k == "models"))
    return tomli_w.dumps({k: plain[k] for k in order})
