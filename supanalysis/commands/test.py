"""``supanalysis test``: the superposition-versus-universality test on two models."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``test`` sub-command."""
    p = subparsers.add_parser("test", help="run the superposition-versus-universality test on two models")
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
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The :class:`~supanalysis.config.TestConfig` of ``--config`` (or the defaults) with the flags applied."""
    from dataclasses import replace

    from ..config import ModelSpec, TestConfig

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


def run(args: argparse.Namespace) -> int:
    """Measure, analyse, write the report folder from rank 0 and print the verdict."""
    from dataclasses import replace

    from ..distributed import init_from_env, leave_process_group
    from ..experiment import run_test
    from ..report.summary import print_summary

    cfg = config_from_args(args)
    if args.resume and not args.checkpoint_dir:
        raise ValueError("--resume needs --checkpoint-dir")
    if args.checkpoint_minutes is not None and args.checkpoint_minutes <= 0:
        raise ValueError(f"--checkpoint-minutes must be positive, got {args.checkpoint_minutes}")
    # Under torchrun (WORLD_SIZE > 1) join the process group: every rank measures its share.
    rank, world, device = init_from_env(cfg.device)
    try:
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
    finally:
        if world > 1:
            leave_process_group()
    return 0
