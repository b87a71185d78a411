"""``supanalysis toy``: toy models of superposition, reproduced with the library's ops."""

from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``toy`` sub-command."""
    p = subparsers.add_parser("toy", help="toy models of superposition: reproduce Elhage et al. with the library's ops")
    p.add_argument("--quick", action="store_true", help="smaller training budgets (CI smoke, < 1 minute)")
    p.add_argument("--out", default="supanalysis-out/toy", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--planted", action="store_true", help="also run the whole test on planted ground truth")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the tour and print each reproduction's outcome; 1 when any of them fails."""
    from ..toy_tour import run_toy_tour

    report = run_toy_tour(
        args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress, planted=args.planted
    )
    print()
    for name, rep in report["reproductions"].items():
        print(f"{name}: {'pass' if rep['pass'] else 'FAIL'} ({rep['expected']})")
    pent = report["reproductions"]["pentagon"]
    print(f"  pentagon D_i = {pent['dims']}; angles {pent['angles_deg']}")
    print(f"  D* over 1/p = {report['reproductions']['sticky_d_star']['d_star']}")
    print(f"matched fraction (τ=0.9) between seeds: {report['matched_fraction_tau_0.9']:.2f}")
    if "planted" in report:
        d = report["planted"]["summary"]["density"]
        print(f"planted: median relative density error {d['median_rel_error']} ({'pass' if d['pass'] else 'FAIL'})")
    print(f"report: {os.path.join(args.out, 'report.md')} and report.json ({report['seconds']} s)")
    return 0 if all(rep["pass"] for rep in report["reproductions"].values()) else 1
