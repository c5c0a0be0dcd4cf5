#!/usr/bin/env python3
"""Fail the build when the venv holds a distribution not pinned, or pinned differently.

Run with the bundled venv's python: `check-pins.py constraints.txt`. Why: the package must
ship exactly the versions the tests ran with; a transitive dependency that only appears
on this release's python (or a missing wheel replaced by another version) is an error.
"""

import re
import sys
from importlib import metadata

ALLOWED_UNPINNED = {"llmux", "pip", "setuptools", "wheel"}


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> int:
    pins: dict[str, str] = {}
    with open(sys.argv[1], encoding="utf-8") as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                pins[canon(name)] = version.strip()
    errors = []
    for dist in metadata.distributions():
        name = canon(dist.metadata["Name"])
        if name in ALLOWED_UNPINNED:
            continue
        if name not in pins:
            errors.append(f"{name}=={dist.version} is bundled but not pinned in constraints.txt")
        elif pins[name] != dist.version:
            errors.append(f"{name}=={dist.version} is bundled but constraints.txt pins "
                          f"{pins[name]}")
    for error in errors:
        print(f"check-pins: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
