#!/usr/bin/env bash
# Fill .whl/ with the wheels bench/gpu_check.sh installs on the GPU machine, which has its own torch,
# Triton and transformers (Python 3.12, x86-64) but no network and none of these:
#
#   bash bench/gpu_wheels.sh [DEST]        (default DEST: .whl, ignored through .git/info/exclude)
#
# bitsandbytes 0.50.2 (the peer measured against; its wheel carries the CUDA kernels), the serving
# stack (FastAPI, Starlette, pydantic + pydantic-core + pydantic-settings, uvicorn, llguidance for
# grammars) at the versions this project's CI uses, and a wheel of quantserve itself (the check
# prefers installing the tree it runs in; this one is the fallback). No dependencies are resolved
# (--no-deps): what the image already has (anyio, h11, click, numpy ...) is not
# brought again (typing-extensions is: pydantic 2.14 needs a recent one; installed with --target, it
# shadows the image's through PYTHONPATH). About 50 MB: the
# device tool carries at most 64 MiB with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >>.git/info/exclude
PLATFORMS=(--platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
           --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$DEST" \
    bitsandbytes==0.50.2 \
    fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 \
    pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
    uvicorn==0.54.0 llguidance==1.9.1
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" .
du -sh "$DEST"
ls "$DEST"
