#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one command, on the GPU machine:
# build the extension with CUDA kernels for sm_90, run the test suite (CUDA backends
# included), benchmark every op on the GPU, and exercise the NCCL path of the test
# (world size 1, then 2 processes sharing the one GPU if NCCL allows it). Results go to
# $OUT (the device tool brings that folder back); copy the tables into bench/RESULTS.md.
#
#   OUT=/tmp/out bash scripts/gpu_session.sh            # on the GPU machine
#   SKIP_TESTS=1 ... / SKIP_BENCH=1 ...                  # to split the work over two calls
#
# Uses the machine's own python3 (PyTorch with CUDA, Triton, pytest, hypothesis are there)
# and builds in place; nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/supanalysis-gpu}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
export SUPANALYSIS_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
start=$(date +%s)
step() { echo; echo "=== [gpu $(( $(date +%s) - start ))s] $*"; }
status=0

step "build (CUDA kernels for sm_$TORCH_CUDA_ARCH_LIST)"
"$PY" setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -m supanalysis.cli info --require-cuda | tee -a "$OUT/gpu.txt" || exit 1

if [ "${SKIP_TESTS:-0}" != "1" ]; then
  step "tests (every backend on CPU and CUDA)"
  SUPANALYSIS_REQUIRE_CPP=1 "$PY" -m pytest -q -x -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/tests.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [ "${SKIP_BENCH:-0}" != "1" ]; then
  step "benchmarks: every op, bf16 and fp32, CUDA and Triton side by side"
  # --write-dispatch records the faster of Triton/CUDA per (op, GPU, dtype) for `auto`;
  # copy $OUT/dispatch.json over supanalysis/dispatch.json (it merges other GPUs' entries).
  cp supanalysis/dispatch.json "$OUT/dispatch.json"
  "$PY" -m bench --markdown "$OUT/bench_gpu.md" --json "$OUT/bench_gpu.json" \
      --write-dispatch "$OUT/dispatch.json" 2>&1 | tail -70 | tee "$OUT/bench.txt"
  "$PY" -m bench.memory --n 65536 --m 4096 | tee -a "$OUT/bench.txt"
  # Issue 6: a million-feature dictionary on one GPU, time and memory, both GPU backends.
  for b in triton cuda; do
    "$PY" -m bench.memory --n 1048576 --m 4096 --dtype bfloat16 --backend "$b" 2>&1 | tail -3 | tee -a "$OUT/bench.txt"
  done
fi

step "NCCL: the test under torchrun, world size 1, then 2 processes on the one GPU"
"$PY" -m supanalysis.cli demo --quick --out "$OUT/demo" --no-progress >"$OUT/demo.txt" 2>&1 || status=1
for n in 1 2; do
  if "$PY" -m torch.distributed.run --nproc-per-node "$n" -m supanalysis.cli test \
      --config "$OUT/demo/config.json" --out "$OUT/nccl$n" --no-progress >"$OUT/nccl$n.txt" 2>&1; then
    "$PY" - "$OUT" "$n" <<'PY' | tee -a "$OUT/nccl.txt"
import json, sys
one = json.load(open(f"{sys.argv[1]}/demo/report.json"))
got = json.load(open(f"{sys.argv[1]}/nccl{sys.argv[2]}/report.json"))
same = one["verdict"] == got["verdict"] and all(
    abs(a["matched_fraction_a"] - b["matched_fraction_a"]) < 1e-6 for a, b in zip(one["pairs"], got["pairs"]))
print(f"NCCL world size {sys.argv[2]}: {'reproduces' if same else 'DIFFERS FROM'} the demo's verdict and matched fractions")
PY
  else
    echo "NCCL world size $n: failed (see nccl$n.txt: NCCL may refuse two ranks on one GPU)" | tee -a "$OUT/nccl.txt"
    tail -5 "$OUT/nccl$n.txt"
  fi
done

step "done in $(( $(date +%s) - start ))s (status $status); results in $OUT"
exit "$status"
