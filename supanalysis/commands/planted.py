"""``supanalysis planted``: the whole test on planted ground truth, compared with the truth."""

from __future__ import annotations

import argparse
import os

from .demo import add_run_verb


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``planted`` sub-command."""
    add_run_verb(subparsers, "planted", "the whole test on planted ground truth, compared with the truth",
                 "supanalysis-out/planted", "smaller everything, same code path (about a minute)", run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run it and print the density and matching outcomes in a few lines."""
    from ..planted import format_number, run_planted

    r = run_planted(args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress)
    d, m = r["summary"]["density"], r["summary"]["matching"]
    print(
        f"densities: {d['represented']}/{d['of']} represented, median relative error "
        f"{format_number(d['median_rel_error'])} ({'pass' if d['pass'] else 'FAIL'})"
    )
    for p in m["pairs"]:
        print(f"{p['site_a']} ~ {p['site_b']}: matched {p['matched_fraction_a']:.2f} vs baseline "
              f"{p['baseline_fraction_a']:.2f}")  # fmt: skip
    print(f"report: {os.path.join(args.out, 'planted.md')} ({r['seconds']['total']} s)")
    return 0
