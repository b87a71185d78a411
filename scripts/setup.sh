#!/usr/bin/env bash
# Set up a virtual environment and build supanalysis into it, from nothing.
#
#   bash scripts/setup.sh            # .venv with the CPU build of torch
#   SUPANALYSIS_TORCH=torch==2.14.1 SUPANALYSIS_CUDA=1 bash scripts/setup.sh   # CUDA build
#   SUPANALYSIS_EXTRAS=dev,interop bash scripts/setup.sh   # also the reference libraries the
#                                                          # interop tests compare against
#
# The extension is compiled against the torch that is installed in the venv first
# (--no-build-isolation): building against another torch gives an ABI mismatch at import.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${SUPANALYSIS_VENV:-.venv}
TORCH_SPEC=${SUPANALYSIS_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "WARNING: Location" >&2); }
pip install -q --upgrade pip
echo "[setup] installing $TORCH_SPEC"
pip install -q "$TORCH_SPEC"
pip install -q setuptools wheel pybind11 ninja numpy
echo "[setup] building supanalysis (C++ extension; CUDA=${SUPANALYSIS_CUDA:-auto})"
EXTRAS=${SUPANALYSIS_EXTRAS:-dev}
# Extras must not replace the torch the extension is built against: pin it while they install.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
pip install -q --no-build-isolation -c "$constraints" -e ".[$EXTRAS]"
"$VENV/bin/supanalysis" info --require-cpp
