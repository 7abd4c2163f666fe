#!/usr/bin/env bash
# The one test command in README.md: set up .venv (torch, the project with its test extras, the
# built-in model), then run pytest. Extra arguments go to pytest.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
EXTRAS=test source "$(dirname "$0")/setup.sh"
# CI requires the native CPU kernels: a missing compiler fails the native tests instead of skipping
# them (kernels/cpu/build.py; a compiler whose build fails always fails them).
export QUANTSERVE_REQUIRE_NATIVE=1
# The pytest script, not `python -m pytest`: -m would put the repository root on sys.path.
exec "$VENV/bin/pytest" "$@"
