#!/usr/bin/env python3
"""Write constraints.txt: exact pins of llmux's runtime dependencies, as installed now.

Run with the test venv's python (``.venv/bin/python packaging/deb/gen-constraints.py``).
Why: the Debian package bundles a venv built with ``-c constraints.txt``, and CI installs
the test venv with the same file, so the versions shipped are the versions tested. Only
runtime dependencies (the closure of ``llmux``'s requirements without extras) are pinned;
dev tools (pytest, ruff, mypy, openai) stay out so they never constrain the package.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HEADER = """\
# Exact versions of llmux's runtime dependencies (closure of pyproject's
# [project] dependencies, no extras), as installed in the test venv.
# The .deb bundles exactly these (packaging/deb/debian/rules: pip -c constraints.txt);
# CI installs the test venv with -c constraints.txt too: shipped == tested.
# Regenerate: make constraints   (packaging/deb/gen-constraints.py)
"""


def runtime_closure(root: str) -> dict[str, str]:
    """Return {distribution name: installed version} for root's runtime requirement closure."""
    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    env["extra"] = ""
    pins: dict[str, str] = {}
    todo = [root]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        key = canonicalize_name(name)
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(name)
        if key != canonicalize_name(root):
            pins[dist.metadata["Name"]] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            todo.append(req.name)
    return pins


def render(pins: dict[str, str]) -> str:
    """Format pins as a pip constraints file, sorted case-insensitively."""
    lines = [f"{name}=={pins[name]}" for name in sorted(pins, key=str.lower)]
    return HEADER + "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="constraints.txt")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs")
    args = parser.parse_args()
    text = render(runtime_closure("llmux"))
    out = Path(args.output)
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is stale: run make constraints", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
