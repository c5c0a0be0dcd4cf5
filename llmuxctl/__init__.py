"""llmuxctl: the operator CLI that talks to llmuxd over its control socket."""

from llmuxd import __version__

__all__ = ["__version__"]
