#!/usr/bin/env bash
# The one serve command in README.md: set up .venv once (torch, the project, the built-in model;
# later starts skip pip, see setup.sh), then start the server. Arguments go to `quantserve serve`
# (a MODEL, --port, ...; see --help).
#   bash scripts/serve.sh [MODEL] [flags...]
set -euo pipefail
source "$(dirname "$0")/setup.sh"
exec "$VENV/bin/quantserve" serve "$@"
