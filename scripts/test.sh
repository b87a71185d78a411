#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, Triton kernels included under
# the CPU interpreter. Extra arguments go to pytest: bash scripts/test.sh -k interference
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${SUPANALYSIS_VENV:-.venv}
# TRITON_INTERPRET=1 runs the Triton kernels on the CPU; SUPANALYSIS_REQUIRE_CPP=1 makes
# the suite fail if the C++ extension did not load instead of silently testing less.
export TRITON_INTERPRET=1 SUPANALYSIS_REQUIRE_CPP=1
set +e
"$VENV/bin/python" -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "[test] pytest collected no tests" >&2; exit 1; fi
exit "$rc"
