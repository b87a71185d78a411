"""The ``supanalysis`` command line: info, demo (and, as issues land, test and toy)."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
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
    print("backends:")
    for st in sa.backends().values():
        print(f"  {st}")
    if args.require_cpp and ext is None:
        print("error: --require-cpp given but supanalysis._C did not load", file=sys.stderr)
        return 1
    if args.require_cuda and (ext is None or not ext.with_cuda):
        print("error: --require-cuda given but the CUDA kernels were not compiled", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supanalysis", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, the native extension, and which backends can run")
    info.add_argument("--require-cpp", action="store_true", help="exit 1 unless the C++ extension loaded")
    info.add_argument("--require-cuda", action="store_true", help="exit 1 unless CUDA kernels were compiled")
    info.set_defaults(func=_cmd_info)
    from .demo import add_demo_parser

    add_demo_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, MemoryError) as exc:
        print(f"supanalysis {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
