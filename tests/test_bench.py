"""Smoke test of the benchmark harness: quick mode, in process, on two small ops."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from bench import report, runner  # noqa: E402


def test_quick_table_has_limits_and_every_requested_op(tmp_path):
    md, js = tmp_path / "results.md", tmp_path / "results.json"
    argv = [
        "--quick",
        "--device",
        "cpu",
        "--ops",
        "stats,interference",
        "--backends",
        "cpp,reference",
    ]
    assert runner.main([*argv, "--markdown", str(md), "--json", str(js)]) == 0

    data = json.loads(js.read_text())
    rows = data["rows"]
    header = data["header"]
    assert header["torch"] and header["device"] and header["date"] and header["commit"]

    def finite_positive(x):
        return x is not None and math.isfinite(x) and x > 0

    limits = [r for r in rows if r["op"] == "limit"]
    assert {r["unit"] for r in limits} == {"B", "FLOP"}  # bandwidth and matmul rows
    for r in limits:
        assert finite_positive(r["seconds"]) and finite_positive(r["rate"])
        assert math.isclose(r["pct_limit"], 100)

    for op in ("stats", "interference"):
        timed = {r["backend"]: r for r in rows if r["op"] == op and r["seconds"] is not None}
        assert {"cpp", "reference", "user"} <= set(timed), f"{op}: timed rows {sorted(timed)}"
        for r in timed.values():
            for key in ("seconds", "rate", "pct_limit", "vs_ref", "vs_user"):
                assert finite_positive(r[key]), f"{op}/{r['backend']}: {key}={r[key]}"
        assert math.isclose(timed["reference"]["vs_ref"], 1)
        assert math.isclose(timed["user"]["vs_user"], 1)
    gram = [r for r in rows if r["op"] == "interference" and r["backend"] in ("bare W@W.T", "cpp")]
    assert len(gram) == 2 and all(finite_positive(r["vs_bare"]) for r in gram)  # vs the bare Gram
    reads = [r for r in rows if r["op"] == "stats" and r["backend"] in ("bare x.sum()", "cpp")]
    assert len(reads) == 2 and all(finite_positive(r["vs_bare"]) for r in reads)  # vs one read of x

    text = md.read_text()
    assert "| limit |" in text and "| stats |" in text and "| interference |" in text
    assert "torch:" in text.split("|", 1)[0]  # header before the table


def test_units_format():
    assert report.fmt_rate(2.5e9, "B") == "2.5 GB/s"
    assert report.fmt_rate(3e12, "FLOP") == "3 TFLOP/s"
    assert report.fmt_time(0.0015) == "1.5 ms"
    assert report.fmt_time(None) == "-"


def test_baselines_over_budget_are_skipped_with_a_note():
    args = runner.parse_args(["--quick", "--device", "cpu", "--ops", "best_match", "--budget", "1e-9"])
    _, rows, _ = runner.run(args)
    by_backend = {r.backend: r for r in rows if r.op == "best_match"}
    for name in ("reference", "user", "bare C.sum()"):
        assert by_backend[name].seconds is None and "skipped: est." in by_backend[name].note
    cpp = by_backend["cpp"]  # a backend is always timed, but an over-budget call only once
    assert cpp.seconds > 0 and cpp.samples == 1 and "one warm call timed" in cpp.note and cpp.vs_ref is None


def test_deadline_lists_the_cases_left_and_files_are_written_as_it_goes(tmp_path):
    js = tmp_path / "results.json"
    args = runner.parse_args(["--quick", "--device", "cpu", "--ops", "best_match,coact", "--json", str(js)])
    seen = []

    def progress(h, rows, notes):
        runner.save(args, h, rows, notes)
        seen.append({r["op"] for r in json.loads(js.read_text())["rows"]})

    args.deadline = 0.0  # past at once: only the limits are measured
    _, rows, _ = runner.run(args, progress)
    left = [r for r in rows if r.op != "limit"]
    assert {r.op for r in left} == {"best_match", "coact"}
    assert all(r.seconds is None and "--deadline" in r.note for r in left)
    assert seen == [{"limit"}]  # after the limits; no case ran

    args.deadline = None
    seen.clear()
    runner.run(args, progress)
    assert len(seen) == 3 and "best_match" in seen[1] and "coact" not in seen[1] and "coact" in seen[2]


def test_cases_run_exactly_the_pairs_given_in_order():
    args = runner.parse_args(["--quick", "--device", "cpu", "--cases", "coact:float32,best_match", "--backends", "cpp"])
    _, rows, _ = runner.run(args)
    ops = [r.op for r in rows if r.op != "limit"]
    assert ops and set(ops) == {"coact", "best_match"} and ops.index("coact") < ops.index("best_match")
    assert {r.dtype for r in rows if r.op == "best_match"} == {"float64"}  # the op's own dtype
    with pytest.raises(SystemExit):
        runner.parse_args(["--cases", "stats:int13"])


def test_sass_counts_the_dense_stats_kernel():
    """bench.sass compiles the Triton stats kernel for sm_90 without a GPU. Its token loop
    must keep reductions inside threads: (almost) no warp shuffles, and well under the ~110
    instructions per element of the earlier tile layout (a static count, not a timing)."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton has no NVIDIA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    out = subprocess.run(
        [sys.executable, "-m", "bench.sass", "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for row in json.loads(out.stdout):
        assert row["registers"] > 0 and row["loops"], row
        fast = row["loops"][0]  # code order: the fast token loop comes before the careful ones
        shuffles = fast["ops"].get("SHFL", 0) / row["elements_per_step"]  # earlier layout: 10-16
        assert fast["ops"].get("LDG", 0) > 0 and shuffles < 0.5, (row["dtype"], fast)
        assert fast["per_element"] < 30, (row["dtype"], fast["per_element"])


def test_end_to_end_quick_times_every_part_side_by_side(tmp_path):
    """bench.end_to_end --quick: the forwards alone, the test's stages from its report, and both
    SAE steps, in the JSON and the Markdown (the plumbing; the numbers are this machine's)."""
    from bench import end_to_end

    js, md = tmp_path / "e2e.json", tmp_path / "e2e.md"
    argv = ["--quick", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run"), "--json", str(js)]
    assert end_to_end.main([*argv, "--markdown", str(md)]) == 0
    res = json.loads(js.read_text())
    s = res["summary"]
    for key in ("forward_full_s", "forward_trunk_s", "measurement_s", "report_s", "sae_training_s", "run_s"):
        assert s[key] > 0, key
    assert s["measurement_over_full_forward"] == s["measurement_s"] / s["forward_full_s"]
    assert s["forward_tokens"] == end_to_end.QUICK.tokens == res["header"]["tokens"]
    stages = {st["stage"]: st for st in res["timings"]["stages"]}
    assert stages["statistics"]["tokens"] == end_to_end.QUICK.tokens
    assert stages["sae_training"]["calls"] == 2 + 8  # every site of A and B
    assert (tmp_path / "run" / "report" / "report.json").is_file()
    steps = {(r["model"], r["step"]) for r in res["sae_steps"]}
    assert steps == {(m, s) for m in "AB" for s in ("plain PyTorch", "supanalysis trainer")}
    assert all(r["seconds"] > 0 and r["pct_of_mm"] > 0 for r in res["sae_steps"])
    text = md.read_text()
    assert "| (b) measurement pass (statistics) |" in text and "| statistics.forward |" in text
