#!/usr/bin/env bash
# Set up a virtual environment and build supanalysis into it, from nothing.
#
#   bash scripts/setup.sh            # .venv with the CPU build of torch
#   SUPANALYSIS_TORCH=torch==2.14.1 SUPANALYSIS_CUDA=1 bash scripts/setup.sh   # CUDA build
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
pip install -q --no-build-isolation -e ".[dev]"
"$VENV/bin/supanalysis" info --require-cpp
