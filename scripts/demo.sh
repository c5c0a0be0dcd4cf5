#!/usr/bin/env bash
# The llmux demo: three simulated models behind one OpenAI-compatible port (:3000).
#
# Sets up .venv if it is missing, initialises the simulated 80 GiB GPU under
# /tmp/llmux-demo, then runs llmuxd on etc/llmux-demo.toml in the foreground
# (Ctrl-C stops it and every child). Try it from another terminal: see the
# examples printed below, or docs/demo.md.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=etc/llmux-demo.toml
STATE=/tmp/llmux-demo

if [ ! -x .venv/bin/llmuxd ]; then
    PY=$(command -v python3.11 || command -v python3)
    echo "== setting up .venv with $PY"
    "$PY" -m venv .venv
    .venv/bin/pip install -q -U pip
    constraints=()
    [ -f constraints.txt ] && constraints=(-c constraints.txt)
    .venv/bin/pip install -q "${constraints[@]}" -e .
fi

mkdir -p "$STATE/logs"
if [ ! -f "$STATE/gpus/gpus.json" ]; then
    .venv/bin/llmux-sim-vllm gpus init "$STATE/gpus" --count 1 --total-mib 81920 \
        --name "Simulated H100 80GB"
fi
.venv/bin/llmuxd -c "$CONFIG" --check-config >/dev/null

cat <<'HELP'
== llmux demo: OpenAI API on http://127.0.0.1:3000/v1 (models qwen-7b, qwen-14b, llama-8b)
   In another terminal:
     curl -s localhost:3000/v1/models | python3 -m json.tool
     curl -s localhost:3000/v1/chat/completions -H 'Content-Type: application/json' \
       -d '{"model": "qwen-7b", "messages": [{"role": "user", "content": "Hello"}]}'
     curl -sN localhost:3000/v1/chat/completions -H 'Content-Type: application/json' \
       -d '{"model": "qwen-14b", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}'
     .venv/bin/llmuxctl -c etc/llmux-demo.toml status
   More (openai client, switching walk-through): docs/demo.md.  Ctrl-C stops the demo.
HELP

PATH="$PWD/.venv/bin:$PATH" exec .venv/bin/llmuxd -c "$CONFIG"
