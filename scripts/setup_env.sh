#!/usr/bin/env bash
# Create or reuse the project's isolated environment (.venv) and install what it needs.
# Idempotent: a stamp keyed on the requirement files skips the install when nothing changed.
#
# CPU set-up (the default here): torch first (a CPU build), then every dependency of nnunetv2 except
# timm/torchvision, then nnunetv2 + dynamic-network-architectures with --no-deps. See README.
#   FLARE_VENV        where the environment lives            (default: <project>/.venv)
#   FLARE_PYTHON      interpreter to build it from           (default: python3.11, else python3)
#   TORCH_SPEC        torch requirement                      (default: torch==2.13.0)
#   TORCH_INDEX_URL   index to take torch from, e.g. PyTorch's CPU wheel index on other machines
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FLARE_VENV:-$here/.venv}"
py="${FLARE_PYTHON:-$(command -v python3.11 || command -v python3)}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

stamp_key=$(cat "$here/requirements/cpu.txt" "$here/pyproject.toml" "$here/scripts/setup_env.sh" \
            | sha256sum | cut -c1-16)
stamp="$venv/.flare-setup-$stamp_key"
if [ -f "$stamp" ]; then
  exit 0
fi

start=$(date +%s)
echo "[setup] building environment in $venv (python: $py)"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${pip[@]}" --index-url "$TORCH_INDEX_URL" "$torch_spec"
else
  "${pip[@]}" "$torch_spec"
fi
"${pip[@]}" -r "$here/requirements/cpu.txt"
"${pip[@]}" --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
"${pip[@]}" --no-deps -e "$here"
# Nothing installed may be broken: every import the pipeline needs must work, and torchvision must
# be absent rather than mismatched.
"$venv/bin/python" - <<'PY'
import importlib, importlib.util, sys
for m in ["torch", "nnunetv2", "dynamic_network_architectures", "papermill", "nibabel", "pydicom",
          "matplotlib", "SimpleITK", "edt", "isal.igzip", "distributed", "dask_jobqueue", "flare_utils",
          "nnunetv2.training.nnUNetTrainer.nnUNetTrainer"]:
    importlib.import_module(m)
assert importlib.util.find_spec("torchvision") is None, "torchvision must not be installed (see README)"
import torch
print(f"[setup] torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
PY
rm -f "$venv"/.flare-setup-*
touch "$stamp"
echo "[setup] done in $(( $(date +%s) - start )) s"
