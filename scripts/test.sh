#!/usr/bin/env bash
# The one test command in README.md: set up .venv (torch, the project with its test extras, the
# built-in model), then run pytest. Extra arguments go to pytest.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
EXTRAS=test source "$(dirname "$0")/setup.sh"
# The pytest script, not `python -m pytest`: -m would put the repository root on sys.path.
exec "$VENV/bin/pytest" "$@"
