"""Build supanalysis._C: C++ CPU kernels always, CUDA kernels when torch and a toolkit allow.

SUPANALYSIS_CUDA controls the CUDA part:
  auto (default) build CUDA kernels when torch is a CUDA build and a working nvcc is found;
                 never fail the install just because CUDA is absent.
  1              require the CUDA kernels; fail loudly if they cannot be built.
  0              C++ CPU kernels only.

Build against the torch you run with: `pip install --no-build-isolation .` (see README).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[supanalysis build] {msg}", file=sys.stderr)


def _find_cuda_home() -> str | None:
    # torch guesses CUDA_HOME from `which nvcc`; /usr/local/bin/nvcc makes it guess
    # /usr/local, which has no libcudart. Prefer an explicit CUDA_HOME, then the
    # conventional /usr/local/cuda, then nvcc's own grandparent directory.
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return os.path.realpath(cand)
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if glob.glob(os.path.join(home, "lib*", "libcudart*")) or glob.glob(
            os.path.join(home, "targets", "*", "lib", "libcudart*")
        ):
            return home
    return None


def _nvidia_wheel_includes() -> list[str]:
    # CUDA builds of torch ship cuBLAS/cuSPARSE headers (needed by ATen's CUDA headers)
    # inside the nvidia-* wheels rather than in the toolkit we compile with.
    import site

    out = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        out += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    return out


def _want_cuda(torch) -> bool:
    mode = os.environ.get("SUPANALYSIS_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        raise SystemExit(f"SUPANALYSIS_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        _log("SUPANALYSIS_CUDA=0: building the C++ CPU kernels only")
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    home = _find_cuda_home()
    if home is None:
        problems.append("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    else:
        os.environ["CUDA_HOME"] = home
        try:
            subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            problems.append(f"nvcc at {home} does not run: {exc}")
    if problems:
        if mode == "1":
            raise SystemExit("SUPANALYSIS_CUDA=1 but CUDA cannot be built: " + "; ".join(problems))
        _log("building without CUDA kernels: " + "; ".join(problems))
        return False
    return True


def _extensions():
    import torch
    from torch.utils import cpp_extension

    # No -std flag: torch adds the standard its headers need (C++20 for torch >= 2.14).
    cxx = ["-O3", "-fopenmp"]
    if os.environ.get("SUPANALYSIS_NATIVE", "0") == "1":
        cxx.append("-march=native")  # opt-in: a wheel built this way runs only on this CPU family
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    with_cuda = _want_cuda(torch)
    if with_cuda:
        # Importing cpp_extension before CUDA_HOME is fixed would freeze torch's guess.
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to query: build for Hopper (the GPUs we target) plus a PTX fallback.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
            _log("no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for sm_90 (+PTX)")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        include_dirs += _nvidia_wheel_includes()
        define_macros.append(("SUPANALYSIS_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]}
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx}
    _log(f"torch {torch.__version__}, CUDA kernels: {'yes' if with_cuda else 'no'}")
    return [
        ext_cls(
            name="supanalysis._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ], cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


ext_modules, build_ext = _extensions()

setup(
    # The Triton kernels are supanalysis.kernels, in the package's own folder: a top-level
    # `kernels` package (even one importable only from a clone's root) would shadow the PyPI
    # project of that name, which transformers imports.
    packages=find_packages(include=["supanalysis", "supanalysis.*"]),
    package_data={"supanalysis": ["dispatch.json"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
