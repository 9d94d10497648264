#!/usr/bin/env bash
# The tests: set up (or reuse) the environment, then run pytest. Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup_env.sh"
venv="${FLARE_VENV:-$here/.venv}"
cd "$here"
exec "$venv/bin/python" -m pytest "$@"
