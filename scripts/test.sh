#!/usr/bin/env bash
# Set up the development venv (pinned like the .deb) and run lint, types and tests.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/daemon -x
# Real-vLLM tests run when LLMUX_REALVLLM=1 (after tests/realvllm/setup.sh);
# the systemd proof runs when LLMUX_SYSTEMD=1 (needs root). .ci/run sets both.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python3.11 || command -v python3)
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
    .venv/bin/pip install -q -U pip
fi
constraints=()
[ -f constraints.txt ] && constraints=(-c constraints.txt)
# Reinstall only when what pip reads changed: a reinstall of the editable package
# while another test run uses this venv (.ci/run runs the slow tiers alongside)
# leaves a moment in which llmuxd cannot be imported.
stamp=$(cat pyproject.toml constraints.txt 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.llmux-installed 2>/dev/null)" != "$stamp" ]; then
    .venv/bin/pip install -q "${constraints[@]}" -e '.[dev]'
    echo "$stamp" > .venv/.llmux-installed
fi
echo "== ruff" && .venv/bin/ruff check .
echo "== mypy" && .venv/bin/mypy
echo "== pytest" && exec .venv/bin/python -m pytest "$@"
