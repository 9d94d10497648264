#!/usr/bin/env bash
# The main job: set up (or reuse) the environment, then run the whole study on the embedded
# synthetic cohort (params/demo.yaml). Extra arguments go to `flare-study run`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup_env.sh"
venv="${FLARE_VENV:-$here/.venv}"
cd "$here"
exec "$venv/bin/flare-study" run "${FLARE_PARAMS:-params/demo.yaml}" "$@"
