"""``supanalysis planted``: the test of the test, on planted ground truth.

``--seeds N`` runs, at N independent seeds, both planting modes of
:mod:`supanalysis.planted_data` (every feature shared; half of them without their context in
family B's training data), each a full :func:`~supanalysis.planted.run_planted_mode`, and tabulates the
truth against the verdict's universality outcome (a confusion table, with U_min per run), in
planted.md and planted.html.
The universal and non-universal runs of one seed share family A's models, whose data does
not depend on the mode. A run already finished in the output folder is read back, not rerun
(:func:`finished_run`), so an interrupted command resumes. Exit status 0 when the table meets
its target (:func:`meets_target`).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import time

from .demo import add_run_verb

#: the verdict's universality outcome each planting mode must produce
EXPECTED = {"universal": "universal_within_reproducibility", "non-universal": "non_universal_features"}
#: seeds of consecutive runs lie this far apart: a run uses seed .. seed + 3 for its four models
SEED_STRIDE = 10
#: full setting: at least this fraction of the runs of each mode judged correctly
FULL_TARGET = 0.9
TITLE = "The test of the test: planted universal and non-universal features"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``planted`` sub-command."""
    what = "the test of the test: planted universal and non-universal features"
    p = add_run_verb(subparsers, "planted", what, "supanalysis-out/planted", "smaller everything, same code path", run)
    p.add_argument("--seeds", type=int, default=1, help="runs per planting mode (default: %(default)s)")
    p.add_argument("--retest", action="store_true",
                   help="test the trained family of every run already finished in --out again (no training), "
                        "e.g. after a change to the analysis; runs not yet there are run in full")  # fmt: skip


def judge_run(result: dict) -> dict:
    """One run's planted.json -> its row of the table: truth, outcome, correct, U_min."""
    mode = result["mode"]
    v = (result["summary"].get("universality") or {}).get("verdict") or {}
    u = v.get("U_min") or {}
    pairs = result["summary"]["matching"]["pairs"]
    return {
        "seed": result["seed"],
        "truth": mode,
        "outcome": v.get("outcome"),
        "correct": v.get("outcome") == EXPECTED[mode],
        "calibrated": bool(v.get("calibrated")),
        "U_min": u.get("value"),
        "U_min_lo": u.get("lo"),
        "U_min_hi": u.get("hi"),
        "planted_matched": sum(p["planted_matched"] for p in pairs),
        "planted_matched_absent": sum(p["planted_matched_absent"] for p in pairs),
        "density_median_rel_error": result["summary"]["density"]["median_rel_error"],
        "seconds": result["seconds"]["total"],
        "retested": bool(result.get("retested")),
    }


def confusion_table(rows: list[dict]) -> dict:
    """Truth (planting mode) against outcome over the judged runs.

    -> {"matrix": {truth: {outcome: count}}, "runs", "correct": {truth: count},
        "mean_U_min": {truth: mean of the runs' U_min values, or None}}; an outcome that is
    missing counts under "none" and as wrong."""
    outcomes = [*EXPECTED.values(), "none"]
    table = {"matrix": {}, "runs": {}, "correct": {}, "mean_U_min": {}}
    for truth in EXPECTED:
        mine = [r for r in rows if r["truth"] == truth]
        table["matrix"][truth] = {o: sum((r["outcome"] or "none") == o for r in mine) for o in outcomes}
        table["runs"][truth] = len(mine)
        table["correct"][truth] = sum(bool(r["correct"]) for r in mine)
        us = [r["U_min"] for r in mine if r["U_min"] is not None and math.isfinite(r["U_min"])]
        table["mean_U_min"][truth] = sum(us) / len(us) if us else None
    return table


def meets_target(table: dict, quick: bool) -> tuple[bool, str]:
    """The table's target.

    Full setting: at least ceil(0.9 n) of the n runs of each mode judged correctly. Quick
    setting (too small to be judged run by run), the direction on both sides: the
    non-universal runs' mean U_min below the universal runs', and below 1."""
    runs, correct, mean_u = table["runs"], table["correct"], table["mean_U_min"]
    if not all(runs.values()):
        return False, "a planting mode has no runs"
    if not quick:
        need = {t: math.ceil(FULL_TARGET * n) for t, n in runs.items()}
        ok = all(correct[t] >= need[t] for t in runs)
        text = "; ".join(f"{t}: {correct[t]}/{runs[t]} correct (need {need[t]})" for t in runs)
        return ok, text
    u, n = mean_u["universal"], mean_u["non-universal"]
    if u is None or n is None:
        return False, "a planting mode has no finite U_min (uncalibrated verdict?)"
    ok = n < u and n < 1.0
    return ok, f"mean U_min: non-universal {n:.3f}, universal {u:.3f} (need non-universal < universal and < 1)"


def run_seeds(
    out: str, seeds: int, quick: bool = False, seed: int = 0, progress: bool = True, retest: bool = False
) -> dict:
    """``seeds`` runs of each planting mode into ``out``/seed-<s>/<mode>; writes planted.json
    and planted.md (the table) into ``out`` and returns the planted.json dict. A run already
    finished there is read back, or with ``retest`` its trained family is tested again."""
    from ..durable import write_text
    from ..planted import FULL, QUICK, run_planted_mode

    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    t0, size, rows = time.time(), (QUICK if quick else FULL), []
    for i in range(seeds):
        s = seed + SEED_STRIDE * i
        shared = None
        for mode in EXPECTED:
            folder = os.path.join(out, f"seed-{s}", mode)
            result = finished_run(folder, s, mode, quick)
            if result is not None and retest:
                result, _ = run_planted_mode(folder, size, s, progress, mode, retest=result)
            elif result is None:
                result, run = run_planted_mode(folder, size, s, progress, mode, shared)
                shared = shared or run
            rows.append(judge_run(result) | {"folder": os.path.relpath(folder, out)})
    table = confusion_table(rows)
    ok, why = meets_target(table, quick)
    summary = {"what": "the test of the test on planted universal and non-universal features", "quick": quick,
               "seeds": seeds, "table": table, "meets_target": ok, "target": why, "runs": rows,
               "seconds": round(time.time() - t0, 1)}  # fmt: skip
    write_text(os.path.join(out, "planted.json"), json.dumps(summary, indent=2))
    write_text(os.path.join(out, "planted.md"), seeds_markdown(summary))
    write_text(os.path.join(out, "planted.html"), seeds_html(summary))
    return summary


def finished_run(folder: str, seed: int, mode: str, quick: bool) -> dict | None:
    """The planted.json of a run already finished in ``folder`` (so an interrupted
    ``--seeds N`` resumes where it stopped), or None when there is none.

    planted.json is a run's last file, written atomically, so its presence means the run
    finished. Raises ValueError naming the file when it fails its checksum or holds a run of
    another seed, mode or size: the folder belongs to another command, never silently reused.
    A resumed non-universal run whose universal partner was finished retrains family A (the
    same seeds, so the same models)."""
    from ..durable import read_checked_json

    path = os.path.join(folder, "planted.json")
    if not os.path.isfile(path):
        return None
    try:
        body, _ = read_checked_json(path)
    except ValueError as e:
        raise ValueError(f"{e}; remove it to run that seed again") from e
    found = (body.get("seed"), body.get("mode"), body.get("quick"))
    if found != (seed, mode, quick):
        raise ValueError(
            f"{path} holds a run of (seed, mode, quick) = {found}, not {(seed, mode, quick)}: use another --out"
        )
    return body


def command_line(summary: dict) -> str:
    """The command that makes ``summary``'s table."""
    return f"supanalysis planted --seeds {summary['seeds']}" + (" --quick" if summary["quick"] else "")


def _tables(summary: dict) -> tuple[list[str], list[list[str]], list[str], list[tuple[list[str], str]]]:
    """The confusion table (header, rows) and the runs (header, (cells, run folder)), as text cells."""
    from ..planted_markdown import format_number

    table, outcomes = summary["table"], [*EXPECTED.values(), "none"]
    head = ["truth \\ verdict", *outcomes, "correct", "mean U_min"]
    rows = [
        [truth, *(str(counts[o]) for o in outcomes), f"{table['correct'][truth]}/{table['runs'][truth]}",
         format_number(table["mean_U_min"][truth])]
        for truth, counts in table["matrix"].items()
    ]  # fmt: skip
    run_head = ["seed", "truth", "outcome", "calibrated", "U_min [CI]", "planted matched (absent)", "density error",
                "s", "retested"]  # fmt: skip
    runs = [
        ([str(r["seed"]), r["truth"], str(r["outcome"]), "yes" if r["calibrated"] else "no",
          f"{format_number(r['U_min'])} [{format_number(r['U_min_lo'])}, {format_number(r['U_min_hi'])}]",
          f"{r['planted_matched']} ({r['planted_matched_absent']})", format_number(r["density_median_rel_error"]),
          str(r["seconds"]), "yes" if r.get("retested") else "no"], r["folder"])
        for r in summary["runs"]
    ]  # fmt: skip
    return head, rows, run_head, runs


def _intro(summary: dict) -> str:
    retested = sum(bool(r.get("retested")) for r in summary["runs"])
    again = (
        f" {retested} of the runs were tested again on their trained families (`--retest`, after a change to the "
        "analysis): their verdicts are the current analysis's."
        if retested
        else ""
    )
    return (
        f"{summary['seeds']} seed(s) per planting mode ({'quick' if summary['quick'] else 'full'} setting), made by "
        f"`{command_line(summary)}`. Rows: the truth; columns: the verdict's universality outcome.{again}"
    )


def seeds_markdown(summary: dict) -> str:
    """The confusion table and the runs behind it, as Markdown."""
    head, rows, run_head, runs = _tables(summary)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    lines = [f"# {TITLE}", "", _intro(summary), "", line(head), "|" + "---|" * len(head)]
    lines += [line(r) for r in rows]
    lines += ["", f"Target: {summary['target']}: **{'met' if summary['meets_target'] else 'NOT met'}**.", ""]
    lines += [line([*run_head, "run"]), "|" + "---|" * (len(run_head) + 1)]
    lines += [line([*cells, f"[{folder}]({folder}/planted.md)"]) for cells, folder in runs]
    return "\n".join(lines) + "\n"


def seeds_html(summary: dict) -> str:
    """The same as :func:`seeds_markdown`, as a standalone HTML page linking each run's report."""
    head, rows, run_head, runs = _tables(summary)
    esc = html.escape

    def table(header: list[str], body: list[list[str]]) -> str:
        th = "".join(f"<th>{esc(h)}</th>" for h in header)
        trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"

    run_rows = [[*map(esc, cells), f'<a href="{esc(folder)}/report.html">{esc(folder)}</a>'] for cells, folder in runs]
    met = "met" if summary["meets_target"] else "NOT met"
    intro = esc(_intro(summary)).replace("`", "")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(TITLE)}</title>"
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.2em .5em}</style></head><body>"
        f"<h1>{esc(TITLE)}</h1><p>{intro}</p>{table(head, [[*map(esc, r)] for r in rows])}"
        f"<p>Target: {esc(summary['target'])}: <b>{met}</b>.</p>{table([*run_head, 'run'], run_rows)}</body></html>\n"
    )


def run(args: argparse.Namespace) -> int:
    """Run the seeds, print the table; 0 when it meets its target, else 1."""
    summary = run_seeds(args.out, args.seeds, quick=args.quick, seed=args.seed, progress=not args.no_progress,
                        retest=args.retest)  # fmt: skip
    print(seeds_markdown(summary).split("\n\n| seed")[0])
    for r in summary["runs"]:
        print(f"seed {r['seed']} {r['truth']}: {r['outcome']} U_min {r['U_min']} ({r['seconds']} s)")
    print(f"report: {os.path.join(args.out, 'planted.md')} ({summary['seconds']} s)")
    return 0 if summary["meets_target"] else 1
