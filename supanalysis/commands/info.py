"""``supanalysis info``: versions, the native extension, and which backends can run."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``info`` sub-command."""
    p = subparsers.add_parser("info", help="versions, the native extension, and which backends can run")
    p.add_argument("--require-cpp", action="store_true", help="exit 1 unless the C++ extension loaded")
    p.add_argument("--require-cuda", action="store_true", help="exit 1 unless CUDA kernels were compiled")
    p.set_defaults(func=run)


def _print_versions() -> object | None:
    """Print the versions, the extension and the GPU; return the extension module (None: not loaded)."""
    import platform

    import torch

    import supanalysis as sa
    from supanalysis import _backend

    print(f"supanalysis {sa.__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  (CUDA build: {torch.version.cuda or 'no'})")
    tv = _backend._triton_version()
    print(f"triton {tv or 'not installed'}")
    ext = _backend.native()
    if ext is None:
        print(f"extension supanalysis._C: NOT LOADED ({_backend.native_error()})")
    else:
        print(f"extension supanalysis._C: loaded from {ext.__file__}")
        print(f"  C++ CPU kernels: yes (OpenMP: {'yes' if ext.with_openmp else 'no'})")
        print(f"  CUDA kernels compiled: {'yes' if ext.with_cuda else 'no'}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    else:
        print("GPU: none visible")
    return ext


def _print_backends() -> None:
    import supanalysis as sa
    from supanalysis import dispatch

    print("backends:")
    for st in sa.backends().values():
        print(f"  {st}")
    try:
        choices = dispatch.table()
        print(f"auto's measured choices: {len(choices)} in {dispatch.table_path()}")
        for c in choices.values():
            print(f"  {c.op} {c.device} {c.dtype} -> {c.backend}")
    except (OSError, ValueError) as exc:
        print(f"auto's measured choices: unusable table ({exc})")


def run(args: argparse.Namespace) -> int:
    """Print what is installed and can run; 1 when a ``--require-*`` flag is not met."""
    ext = _print_versions()
    _print_backends()
    if args.require_cpp and ext is None:
        print("error: --require-cpp given but supanalysis._C did not load", file=sys.stderr)
        return 1
    if args.require_cuda and (ext is None or not ext.with_cuda):
        print("error: --require-cuda given but the CUDA kernels were not compiled", file=sys.stderr)
        return 1
    return 0
