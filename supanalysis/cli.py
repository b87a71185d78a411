"""The ``supanalysis`` command line: test, demo, toy, info."""

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
    from supanalysis import dispatch

    try:
        choices = dispatch.table()
        print(f"auto's measured choices: {len(choices)} in {dispatch.table_path()}")
        for c in choices.values():
            print(f"  {c.op} {c.device} {c.dtype} -> {c.backend}")
    except (OSError, ValueError) as exc:
        print(f"auto's measured choices: unusable table ({exc})")
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
    _add_test_parser(sub)
    from .demo import add_demo_parser
    from .planted import add_planted_parser
    from .toy_tour import add_toy_parser

    add_demo_parser(sub)
    add_toy_parser(sub)
    add_planted_parser(sub)
    return p


def _add_test_parser(sub) -> None:
    p = sub.add_parser("test", help="run the superposition-versus-universality test on two models")
    p.add_argument("--config", help="a TOML or JSON TestConfig; flags below override its fields")
    p.add_argument("--model-a", help="folder of model A (TinyTransformer or Hugging Face, loaded locally)")
    p.add_argument("--model-b", help="folder of model B")
    p.add_argument("--tokens", help="token ids file (.npy, or .bin with --token-dtype)")
    p.add_argument("--token-dtype", choices=["uint8", "uint16", "uint32", "int32"])
    p.add_argument("--sites-a", nargs="+", help="sites of A (default: every layer's resid_post)")
    p.add_argument("--sites-b", nargs="+", help="sites of B")
    p.add_argument("--dict-a", help='dictionaries of A: a folder with one subfolder per site, "neuron" or "train"')
    p.add_argument("--dict-b", help="dictionaries of B (as --dict-a)")
    p.add_argument("--tau", type=float, help="best-match correlation threshold τ")
    p.add_argument("--phi", type=float, help="matched-fraction threshold φ")
    p.add_argument("--C", type=float, dest="C", help="compressed-sensing constant C")
    p.add_argument("--out", default="supanalysis-out/test", help="report folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    ck = p.add_argument_group("checkpoint and resume")
    ck.add_argument("--checkpoint-dir", help="save the measurement pass's state here (one folder per run)")
    ck.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir's last checkpoint")
    ck.add_argument(
        "--checkpoint-every", type=int, metavar="TOKENS", help="checkpoint every TOKENS statistics tokens per rank"
    )
    ck.add_argument(
        "--checkpoint-minutes", type=float, default=10.0, help="and at least every this many minutes (%(default)s)"
    )
    p.set_defaults(func=_cmd_test)


def _test_config(args: argparse.Namespace):
    from dataclasses import replace

    from .config import ModelSpec, TestConfig

    cfg = TestConfig.load(args.config) if args.config else TestConfig()
    a, b = cfg.model_a, cfg.model_b
    a = replace(a, path=args.model_a or a.path, sites=args.sites_a or a.sites, dictionary=args.dict_a or a.dictionary)
    b = replace(b, path=args.model_b or b.path, sites=args.sites_b or b.sites, dictionary=args.dict_b or b.dictionary)
    th = cfg.thresholds
    th = replace(
        th,
        tau=th.tau if args.tau is None else args.tau,
        phi=th.phi if args.phi is None else args.phi,
        C=th.C if args.C is None else args.C,
    )
    cfg = replace(cfg, model_a=ModelSpec(**vars(a)), model_b=ModelSpec(**vars(b)), thresholds=th)
    if args.tokens:
        cfg = replace(cfg, tokens=args.tokens)
    if args.token_dtype:
        cfg = replace(cfg, token_dtype=args.token_dtype)
    if not cfg.model_a.path or not cfg.model_b.path or not cfg.tokens:
        raise ValueError("need --config or all of --model-a, --model-b and --tokens")
    return cfg


def _cmd_test(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .distributed import init_from_env
    from .pipeline import run_test

    cfg = _test_config(args)
    if args.resume and not args.checkpoint_dir:
        raise ValueError("--resume needs --checkpoint-dir")
    if args.checkpoint_minutes is not None and args.checkpoint_minutes <= 0:
        raise ValueError(f"--checkpoint-minutes must be positive, got {args.checkpoint_minutes}")
    # Under torchrun (WORLD_SIZE > 1) join the process group: every rank measures its share.
    rank, _world, device = init_from_env(cfg.device)
    if device != cfg.device:
        cfg = replace(cfg, device=device)
    report = run_test(
        cfg,
        progress=not args.no_progress and rank == 0,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        checkpoint_every_tokens=args.checkpoint_every,
        checkpoint_every_seconds=args.checkpoint_minutes * 60.0,
    )
    if rank == 0:
        report.write(args.out)  # only after every measurement succeeded: no partial report
        print_summary(report.data, args.out)
    return 0


def print_summary(report: dict, out: str) -> None:
    """The verdict and the numbers behind it, in a few lines, and where the report is."""
    import os

    v = report["verdict"]
    print()
    print(f"verdict: {v['outcome']}: {v['reason']}")
    for p in report["premises"]:
        print(f"  {'ok ' if p['holds'] else 'NOT'} {p['name']}: {p['detail']}")
    for pr in report["pairs"]:
        lr = pr["median_log_ratio"]
        lr_text = "—" if lr["value"] is None else f"{lr['value']:.3f} [{lr['lo']:.3f}, {lr['hi']:.3f}]"
        pi = pr["predicted_ratio"]
        print(
            f"  {pr['site_a']} ~ {pr['site_b']}: matched {pr['matched_fraction_a']:.2f} "
            f"(baseline {pr['baseline_fraction_a']:.2f}), median ln ratio {lr_text}, "
            f"π {'—' if pi is None else f'{pi:.3f}'} -> {pr['verdict']['outcome']}"
        )
    print(f"report: {os.path.join(out, 'report.html')} (also report.md, report.json)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, MemoryError) as exc:
        print(f"supanalysis {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
