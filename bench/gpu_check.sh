#!/usr/bin/env bash
# The GPU check in one go (about 5-6 minutes on an H100/H200 with no network):
#
#   bash bench/gpu_check.sh OUTDIR [--dry-run]
#
# 1. installs what the GPU machine lacks from the wheels in .whl/ (bench/gpu_wheels.sh fills it
#    here: bitsandbytes, FastAPI, pydantic-settings, uvicorn ...; pip install --no-index) and this
#    tree itself (into /tmp/quantserve-site, on PYTHONPATH);
# 2. pytest -m gpu on the GPU tests (kernels vs the reference in bf16/fp16, the engine vs the CPU path);
# 3. the kernel table (bench/gpu_check.py kernels);
# 4. end to end on a Llama-3-8B-shaped NF4 model (bench/gpu_check.py e2e);
# 5. the report: OUTDIR/gpu_check.md and OUTDIR/gpu_check.json.
# Each part has its own time limit, so a hang costs that part only; the report says what is missing.
# --dry-run: no installs, the tiny CPU variants of 3-4 and pytest -m gpu (which skips without a GPU):
# checks the plumbing on a machine without a GPU (tests/test_gpu_check.py runs it).
set -u
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR [--dry-run]}
DRY=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: >"$OUT/times.txt"
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && [ "$DRY" = "--dry-run" ]; then PY=.venv/bin/python; fi
# One benchmark at a time (bench/lock.py): the whole check runs under the lock, its parts inherit it.
# The dry run times nothing and does not wait for it.
if [ "$DRY" != "--dry-run" ] && [ -z "${QUANTSERVE_BENCH_LOCK_HELD:-}" ]; then
    exec "$PY" bench/lock.py bash bench/gpu_check.sh "$OUT" "${@:2}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
# the tuning cache lands here, so a second run of this script starts warm
export QUANTSERVE_CACHE=${QUANTSERVE_CACHE:-$HOME/.cache/quantserve}

part() {  # part NAME LIMIT_SECONDS COMMAND...: run, log, time
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)" >&2
    # SIGINT first: pytest still writes its junit XML of the tests run so far, the parts their JSON
    timeout -s INT --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name $((SECONDS - t0))" >>"$OUT/times.txt"
    echo "   $name: exit $rc after $((SECONDS - t0)) s" >&2
    tail -n 5 "$OUT/$name.log" >&2
    return 0
}

if [ "$DRY" != "--dry-run" ]; then
    SITE=/tmp/quantserve-site
    t0=$SECONDS
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .whl/*.whl >"$OUT/install.log" 2>&1 || { echo "wheel install failed: see $OUT/install.log" >&2; }
    fi
    # this tree, built with the machine's own setuptools (no network, no build isolation)
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE/qs" . \
        >>"$OUT/install.log" 2>&1 || echo "installing this tree failed: see $OUT/install.log" >&2
    export PYTHONPATH="$SITE/qs:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "install $((SECONDS - t0))" >>"$OUT/times.txt"
    "$PY" -c "import torch, triton, transformers, bitsandbytes, quantserve.server.engine as e; \
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, \
'bitsandbytes', bitsandbytes.__version__, torch.cuda.get_device_name(0))" >&2 || true
fi

part pytest 110 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest.xml" \
    tests/server/engine/test_gpu_engine.py tests/kernels/test_gpu_paged_attention.py tests/kernels/test_gpu.py
part kernels 80 "$PY" bench/gpu_check.py kernels "$OUT" $DRY
part e2e 170 "$PY" bench/gpu_check.py e2e "$OUT" $DRY
"$PY" bench/gpu_check.py report "$OUT"
