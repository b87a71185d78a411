#!/usr/bin/env bash
# GPU benchmark and check run, in one command, on a machine with one or more CUDA GPUs,
# inside one time budget: load (or build) the extension with its CUDA kernels, run the
# tests of the GPU backends, time every op in every dtype on the GPU with
# `python -m bench --device cuda` (every backend and named CUDA variant side by side,
# writing a measured dispatch table), time the interference of n = 65,536 and
# n = 1,048,576 features, the whole test end to end on a GPT-2-shaped pair with TopK SAEs
# (`python -m bench.end_to_end`), and, with more than one GPU, run the NCCL path of
# `supanalysis test` under torchrun across them.
#
#   OUT=/tmp/out bash scripts/gpu_bench.sh                     # results in /tmp/out
#   DEADLINE=470 TEST_S=110 RESERVE_S=250 E2E_S=100 ...         # budget: whole, tests, after bench, end to end
#   SKIP_TESTS=1 ... / SKIP_BENCH=1 ... / SKIP_NCCL=1           # split over several calls
#   TESTS_K="cuda and stats" BENCH_ARGS="--cases stats:bfloat16 ..." MEM_BACKENDS=cuda  # narrower
#   DTYPES=bfloat16,float32 ...                                 # the bench's dtypes
#   CPU_SMOKE=1 OUT=/tmp/out bash scripts/gpu_bench.sh         # the plumbing, on small CPU work
#
# Every step gets at most what is left of DEADLINE seconds (default 470), the steps run
# most-wanted first (extension, GPU tests, bench, interference memory, end to end, NCCL), and each
# writes its results into $OUT as it goes (the bench rewrites its tables after every case),
# so a run cut short still leaves what it measured.
# The build (minutes) is skipped when prebuilt/ holds a _C built for this python and torch
# from these very sources (scripts/check_cuda_build.sh with SUPANALYSIS_PREBUILT_DIR=prebuilt).
# Results, at most nine files in $OUT: run.log, tests.txt, bench_gpu.md, bench_gpu.json,
# dispatch.json, memory.txt, e2e.md, e2e.json, nccl.txt. The tables go into bench/RESULTS.md and dispatch.json
# over supanalysis/dispatch.json (it merges other GPUs' entries).
#
# Uses the machine's python3 (PyTorch with CUDA, Triton and pytest; pytest-xdist if there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/supanalysis-gpu}"
WORK="$(mktemp -d)"  # demo and report folders: too many files to bring back
mkdir -p "$OUT"
PY="${PY:-python3}"
DEADLINE="${DEADLINE:-470}"
TEST_S="${TEST_S:-110}" TEST_WORKERS="${TEST_WORKERS:-12}" RESERVE_S="${RESERVE_S:-250}" E2E_S="${E2E_S:-100}"
export PYTHONUNBUFFERED=1
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
export SUPANALYSIS_CUDA="${SUPANALYSIS_CUDA:-1}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
# What each step runs: the GPU work, or (CPU_SMOKE=1) the same steps on small CPU work, to
# check the script itself on a machine without a GPU.
if [ "${CPU_SMOKE:-0}" = "1" ]; then
  export SUPANALYSIS_CUDA=0
  require=--require-cpp tests_k="dispatch" bench_args=(--quick --device cpu --ops best_match,coact)
  mem_small=(--n 2048 --m 64 --backend cpp) mem_large=(--n 4096 --m 64) mem_backends=(cpp) gpu=false
  e2e_args=(--quick --device cpu)
else
  # TESTS_K, BENCH_ARGS and MEM_BACKENDS narrow a later call to what changed.
  require=--require-cuda tests_k="${TESTS_K:-cuda or gpu or triton}"
  # Every op (the most used first) in every dtype, the GPU backends with their variants;
  # the float64 reference left out (slow), a baseline over 2 s per call skipped.
  read -r -a bench_args <<<"${BENCH_ARGS:---ops stats,interference,cross,coact_sparse,interference_topk,coact,\
stats_sparse,best_match --dtype ${DTYPES:-bfloat16,float16,float32,float64} --backends triton,cuda --budget 2}"
  read -r -a mem_backends <<<"${MEM_BACKENDS:-triton cuda}"
  mem_small=(--n 65536 --m 4096) mem_large=(--n 1048576 --m 4096) gpu=true
  # The GPT-2-shaped pair, TopK e8 k32 at every site; sized to fit E2E_S (10^7 tokens would not).
  read -r -a e2e_args <<<"${E2E_ARGS:---device cuda --dictionary topk --tokens 524288 --sae-tokens 131072}"
fi
start=$(date +%s)
left() { echo $((DEADLINE - ($(date +%s) - start))); }
step() { echo; echo "=== [gpu $(($(date +%s) - start))s, $(left)s left] $*"; }
# within SECONDS CMD...: run CMD for at most SECONDS (and never past the deadline).
within() {
  local s=$1 l
  shift
  l=$(left)
  ((s > l)) && s=$l
  if ((s < 5)); then echo "skipped: the deadline has passed"; return 124; fi
  timeout --kill-after=10 "$s" "$@"
}

main() {
status=0
step "extension: the prebuilt supanalysis._C where its source stamp matches, else a build for sm_$TORCH_CUDA_ARCH_LIST"
$gpu && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
# A _C built elsewhere for this machine's python and torch (check_cuda_build.sh with
# SUPANALYSIS_PREBUILT_DIR) saves the build's minutes, if it was built from these sources.
if $gpu && [ -f prebuilt/stamp ] && [ "$(cat prebuilt/stamp)" = "$(bash scripts/source_stamp.sh)" ]; then
  cp prebuilt/_C*.so supanalysis/ && echo "prebuilt $(cd prebuilt && ls _C*.so) (source stamp $(cat prebuilt/stamp))"
fi
if ! "$PY" -m supanalysis.cli info $require >/dev/null 2>&1; then
  echo "building (the prebuilt extension is missing, stale or does not load here)"
  if ! within 300 "$PY" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1; then
    tail -60 "$WORK/build.log"
    return 1
  fi
fi
"$PY" -m supanalysis.cli info $require || return 1
if $gpu; then  # both GPU backends, or the side-by-side numbers mean little
  "$PY" -c "from supanalysis._backend import backend_status as b; s = b(); \
bad = [str(s[k]) for k in ('triton', 'cuda') if not s[k].available]; assert not bad, bad" || return 1
fi

if [ "${SKIP_TESTS:-0}" != "1" ]; then
  step "tests of the GPU backends (CPU-only tests run in CI)"
  par=()
  "$PY" -c "import xdist" 2>/dev/null && par=(-n "$TEST_WORKERS")
  # -v: one line per test as it ends, so a run cut off by its time limit still says which passed.
  within "$TEST_S" env SUPANALYSIS_REQUIRE_CPP=1 "$PY" -m pytest -v --tb=short -rfE -p no:cacheprovider \
    "${par[@]}" -k "$tests_k" >"$OUT/tests.txt" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || status=1
  echo "pytest rc $rc: $(grep -c ' PASSED' "$OUT/tests.txt") passed, $(grep -c ' FAILED' "$OUT/tests.txt") failed, \
$(grep -c ' SKIPPED' "$OUT/tests.txt") skipped, $(grep -c ' ERROR' "$OUT/tests.txt") errors"
  grep -E '^(FAILED|ERROR)' "$OUT/tests.txt" | head -30
  tail -3 "$OUT/tests.txt"
fi

if [ "${SKIP_BENCH:-0}" != "1" ]; then
  step "benchmarks: every op, bf16 and fp32, CUDA and Triton side by side"
  cp supanalysis/dispatch.json "$OUT/dispatch.json"
  # Leave RESERVE_S for the million-feature run (and NCCL); a case in flight may overrun.
  bench_deadline=$(($(left) - RESERVE_S))
  within $((bench_deadline + 90)) "$PY" -m bench "${bench_args[@]}" --deadline "$bench_deadline" \
    --markdown "$OUT/bench_gpu.md" --json "$OUT/bench_gpu.json" --write-dispatch "$OUT/dispatch.json" \
    2>&1 | tail -80 || status=1

  step "interference memory and time: n = 65,536 and n = 1,048,576 (m = 4,096)"
  {
    within 40 "$PY" -m bench.memory "${mem_small[@]}" --dtype bfloat16 2>&1 | tail -2
    for b in "${mem_backends[@]}"; do  # the likely faster first: one completing is the target
      within 90 "$PY" -m bench.memory "${mem_large[@]}" --dtype bfloat16 --backend "$b" 2>&1 | tail -2
    done
  } | tee "$OUT/memory.txt"

  step "end to end: forwards alone vs the measurement pass vs report vs SAE training"
  within "$E2E_S" "$PY" -m bench.end_to_end "${e2e_args[@]}" --no-progress \
    --markdown "$OUT/e2e.md" --json "$OUT/e2e.json" 2>&1 | tail -30 || status=1
fi

step "NCCL: the test under torchrun across the GPUs (more than one needed)"
ngpu=0
$gpu && ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${SKIP_NCCL:-0}" = "1" ] || [ "$ngpu" -lt 2 ]; then
  echo "skipped ($([ "${SKIP_NCCL:-0}" = "1" ] && echo SKIP_NCCL=1 || echo "$ngpu GPU(s)"))" | tee "$OUT/nccl.txt"
  step "done (status $status); results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
  return "$status"
fi
{
  within 60 "$PY" -m supanalysis.cli demo --quick --out "$WORK/demo" --no-progress >"$WORK/demo.txt" 2>&1 ||
    { echo "quick demo failed:"; tail -5 "$WORK/demo.txt"; }
  if [ -f "$WORK/demo/config.json" ]; then
    if within 120 "$PY" -m torch.distributed.run --nproc-per-node "$ngpu" -m supanalysis.cli test \
      --config "$WORK/demo/config.json" --out "$WORK/nccl" --no-progress >"$WORK/nccl.txt" 2>&1; then
      "$PY" - "$WORK" "$ngpu" <<'PY'
import json, sys
one = json.load(open(f"{sys.argv[1]}/demo/report.json"))
got = json.load(open(f"{sys.argv[1]}/nccl/report.json"))
same = one["verdict"] == got["verdict"] and all(
    abs(a["matched_fraction_a"] - b["matched_fraction_a"]) < 1e-6 for a, b in zip(one["pairs"], got["pairs"]))
print(f"NCCL over {sys.argv[2]} GPUs: {'reproduces' if same else 'DIFFERS FROM'} the demo's verdict and matched fractions")
PY
    else
      echo "NCCL over $ngpu GPUs: failed or out of time:"
      tail -5 "$WORK/nccl.txt"
      status=1
    fi
  fi
} | tee "$OUT/nccl.txt"

step "done (status $status); results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
return "$status"
}

main 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
