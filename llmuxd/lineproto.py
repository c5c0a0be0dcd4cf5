"""The lease socket's framing, shared by both ends: newline-terminated lines.

The daemon's lease listener (control/lease_listener.py) and the front end's lease
client (proxy/lease_client.py) read the same byte stream shape; one splitter keeps
them from drifting apart. Base layer: the front end may import it.
"""

from __future__ import annotations


def split_lines(buf: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines in ``buf`` (without their newline) and the unfinished rest."""
    *lines, rest = buf.split(b"\n")
    return lines, rest
