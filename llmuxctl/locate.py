"""Where the daemon's socket is: -s, else $LLMUX_SOCKET, else the config's daemon.socket.

The config is read leniently on purpose: an operator who is halfway through editing
/etc/llmux.toml (an unknown key, say) must still be able to ask the running daemon
what it is doing, so when the full check fails we still take ``daemon.socket`` from the
raw file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmuxctl.errors import DEFAULT_CONFIG, DEFAULT_SOCKET, UsageError
from llmuxd.config import ConfigError, load_config, parse_text


@dataclass(frozen=True)
class Target:
    """The socket to talk to, how it was found, and the model names the config lists."""

    socket: str
    source: str                  # "-s", "LLMUX_SOCKET", the config path, or "default"
    config_models: tuple[str, ...] = ()


def _raw_config(path: str) -> dict[str, Any] | None:
    """The parsed but unchecked file, or None when it cannot even be parsed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        return parse_text(text, Path(path))
    except (OSError, UnicodeDecodeError, ConfigError):
        return None


def read_config(path: str, *, explicit: bool) -> tuple[str | None, tuple[str, ...]]:
    """The socket path and model names of a config file.

    ``explicit`` (given with -c): an unreadable file is a usage error. The default
    config may be missing or unreadable (a user outside group llmux): then (None, ()).
    """
    try:
        config = load_config(path)
    except ConfigError as exc:
        raw = _raw_config(path)
        daemon = raw.get("daemon") if raw else None
        socket = daemon.get("socket") if isinstance(daemon, dict) else None
        models = raw.get("models") if raw else None
        names = tuple(models) if isinstance(models, dict) else ()
        if raw is not None:
            return (socket if isinstance(socket, str) and socket else None), names
        if explicit:
            first = exc.errors[0] if exc.errors else str(exc)
            raise UsageError(
                f"cannot use config {path}: {first}; "
                f"check it with: llmuxd -c {path} --check-config",
                code="bad_config",
            ) from None
        return None, ()
    return config.daemon.socket, tuple(config.models)


def resolve(socket: str | None, config: str | None,
            environ: dict[str, str] | os._Environ[str] | None = None) -> Target:
    """Apply the resolution order of llmuxctl(1): -s, $LLMUX_SOCKET, -c's daemon.socket.

    The config is read even when the socket comes from elsewhere, for its model names
    (shell completion), unless it is the default one and not readable.
    """
    env = os.environ if environ is None else environ
    explicit = config is not None
    path = config if config is not None else DEFAULT_CONFIG
    names: tuple[str, ...] = ()
    from_config: str | None = None
    if explicit or (not socket and os.access(path, os.R_OK)):
        from_config, names = read_config(path, explicit=explicit)
    if socket:
        return Target(socket, "-s", names)
    if env.get("LLMUX_SOCKET"):
        return Target(env["LLMUX_SOCKET"], "LLMUX_SOCKET", names)
    if from_config:
        return Target(from_config, path, names)
    return Target(DEFAULT_SOCKET, "default", names)
