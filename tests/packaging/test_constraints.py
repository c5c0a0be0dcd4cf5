"""constraints.txt pins exactly what the tests run with (what the .deb bundles).

The package build installs its venv with ``-c constraints.txt`` and refuses any
unpinned or differently pinned distribution (packaging/deb/debian/check-pins.py); this
test keeps the file in step with the test venv, so shipped == tested.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]


def test_constraints_match_the_installed_runtime_dependencies() -> None:
    r = subprocess.run(
        [sys.executable, str(TOP / "packaging/deb/gen-constraints.py"), "--check",
         "-o", str(TOP / "constraints.txt")],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr + " (run: make constraints, then commit constraints.txt)"


def test_constraints_pin_every_line_exactly() -> None:
    for line in (TOP / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and name and version and not any(c in version for c in "<>=*,;"), line
