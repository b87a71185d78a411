#!/usr/bin/env bash
# Compile and link every CUDA source of supanalysis._C for sm_90 against a CUDA build of
# torch, on a machine with no GPU. Nothing runs on a device: this proves the kernels build
# and that the extension exports every *_cuda launcher and every named CUDA variant
# (supanalysis/ops/cuda_variants.py's NATIVE_NAMES), which CI cannot otherwise see.
#
#   scripts/check_cuda_build.sh            # uses (or creates) .venv-cuda at the repo root
#   SUPANALYSIS_CUDA_VENV=/path/venv scripts/check_cuda_build.sh
#   KEEP_BUILD=1 scripts/check_cuda_build.sh   # keep the temp build dir for inspection
#   SUPANALYSIS_PREBUILT_DIR=prebuilt ...      # also keep the built _C*.so there, with the
#                                              # source stamp it was built from
# A build for another machine (a GPU machine's python3.12 + torch 2.11, say), to save its time:
#   SUPANALYSIS_CUDA_PYTHON=python3.12 SUPANALYSIS_CUDA_TORCH=torch==2.11.0 \
#   SUPANALYSIS_CUDA_VENV=.venv-gpu SUPANALYSIS_PREBUILT_DIR=prebuilt scripts/check_cuda_build.sh
#
# The build happens in a temporary copy of the tracked source tree, so the working tree
# (and its CPU-only in-tree _C*.so) is never touched.
set -euo pipefail

die() { echo "check_cuda_build: FAIL: $*" >&2; exit 1; }
log() { echo "check_cuda_build: $*" >&2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SUPANALYSIS_CUDA_VENV:-$ROOT/.venv-cuda}"
TORCH_SPEC="${SUPANALYSIS_CUDA_TORCH:-torch==2.14.1}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
start=$(date +%s)

[ -x "$CUDA_HOME/bin/nvcc" ] || die "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME to a CUDA 13 toolkit)"
command -v git >/dev/null || die "git is needed to list the tracked source files"

# 1. A venv with a CUDA build of torch (a CPU build has no ATen CUDA headers).
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  log "creating $VENV with $TORCH_SPEC (CUDA build; several GB, about a minute or two)"
  rm -rf "$VENV"
  "${SUPANALYSIS_CUDA_PYTHON:-python3}" -m venv "$VENV" || die "could not create the venv $VENV"
  "$PY" -m pip install --quiet "$TORCH_SPEC" numpy pybind11 ninja setuptools wheel \
    || die "pip could not install $TORCH_SPEC and the build tools into $VENV"
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" \
  || die "torch in $VENV is not a CUDA build"
"$PY" -c "import ninja, pybind11, setuptools" 2>/dev/null \
  || "$PY" -m pip install --quiet numpy pybind11 ninja setuptools wheel \
  || die "could not install the build tools into $VENV"
log "torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'), nvcc $("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"

# 2. A copy of the tracked (and untracked, not ignored) sources: no venvs, builds or .so.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/supanalysis-cuda-build.XXXXXX")"
if [ "${KEEP_BUILD:-0}" = "1" ]; then
  log "keeping the build dir $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi
# Files deleted from the working tree but not yet from the index are left out.
(cd "$ROOT" && git ls-files -z -co --exclude-standard \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf -) | tar -xf - -C "$WORK" \
  || die "could not copy the source tree into $WORK"
ls "$WORK"/csrc/cuda/*.cu >/dev/null 2>&1 || die "no CUDA sources under csrc/cuda/"

# 3. Build with the CUDA kernels required (SUPANALYSIS_CUDA=1 fails loudly rather than
#    silently building the CPU-only extension).
log "building in $WORK (sm_90; this is the slow part)"
export PATH="$VENV/bin:$CUDA_HOME/bin:$PATH"
export SUPANALYSIS_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
if ! (cd "$WORK" && "$PY" setup.py build_ext --inplace >"$WORK/build.log" 2>&1); then
  grep -E "error|Error" "$WORK/build.log" | head -40 >&2 || true
  echo "----- last lines of the build log -----" >&2
  tail -40 "$WORK/build.log" >&2
  die "the CUDA build failed (full log: $WORK/build.log; rerun with KEEP_BUILD=1 to keep it)"
fi
SO="$(ls "$WORK"/supanalysis/_C*.so 2>/dev/null | head -1)"
[ -n "$SO" ] || die "the build produced no supanalysis/_C*.so"

# 4. Import the built module (torch first: _C links against libtorch) and check that every
#    CUDA launcher is there. Importing needs no GPU; calling them would.
(cd "$WORK" && "$PY" - <<'EOF') || die "the built extension is missing CUDA launchers (see above)"
import ast, importlib.util, sys
import torch  # noqa: F401  (loads libtorch / libc10_cuda for the extension)
import glob
so = glob.glob("supanalysis/_C*.so")[0]
spec = importlib.util.spec_from_file_location("supanalysis._C", so)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
# Every op has a CPU and a CUDA launcher: each *_cpu must have its *_cuda twin.
want = sorted(n[: -len("_cpu")] + "_cuda" for n in dir(mod) if n.endswith("_cpu"))
# Every named variant's bound function (the table is a literal: read without importing).
tree = ast.parse(open("supanalysis/ops/cuda_variants.py").read())
table = next(n.value for n in tree.body if isinstance(n, ast.AnnAssign) and n.target.id == "NATIVE_NAMES")
variants = sorted(f for named in ast.literal_eval(table).values() for f in named.values())
missing = [w for w in want + variants if not hasattr(mod, w)]
if not getattr(mod, "with_cuda", False):
    print("with_cuda is not True in the built extension", file=sys.stderr)
    sys.exit(1)
if missing:
    print("missing launchers: " + ", ".join(missing), file=sys.stderr)
    sys.exit(1)
print(f"check_cuda_build: {so}: with_cuda=True, {len(want)} CUDA launchers and {len(variants)} variants present")
EOF
if [ -n "${SUPANALYSIS_PREBUILT_DIR:-}" ]; then
  mkdir -p "$SUPANALYSIS_PREBUILT_DIR"
  rm -f "$SUPANALYSIS_PREBUILT_DIR"/_C*.so
  cp "$SO" "$SUPANALYSIS_PREBUILT_DIR/"
  bash "$ROOT/scripts/source_stamp.sh" "$WORK" >"$SUPANALYSIS_PREBUILT_DIR/stamp"
  log "kept $(basename "$SO") in $SUPANALYSIS_PREBUILT_DIR (source stamp $(cat "$SUPANALYSIS_PREBUILT_DIR/stamp"))"
fi
log "OK in $(( $(date +%s) - start )) s"
