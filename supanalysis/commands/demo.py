"""``supanalysis demo``: train two equal-parameter models here and run the test on them."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_run_verb(
    subparsers: argparse._SubParsersAction,
    name: str,
    help: str,
    out: str,
    quick_help: str,
    run: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """A verb that builds its models and runs the test: --quick, --out, --seed, --no-progress."""
    p = subparsers.add_parser(name, help=help)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", default=out, help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` sub-command."""
    add_run_verb(subparsers, "demo", "train two equal-parameter models here and run the test on them",
                 "supanalysis-out/demo", "smaller everything, same code path (< 2 minutes)", run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the verdict and the numbers behind it."""
    from ..demo import run_demo
    from ..report.summary import print_summary

    report = run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress)
    print_summary(report.data, args.out)
    return 0
