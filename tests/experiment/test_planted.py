"""The whole test on planted ground truth: generator exactness, and recovery at the quick size."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from supanalysis.commands.planted import (
    EXPECTED,
    confusion_table,
    finished_run,
    judge_run,
    meets_target,
    run_seeds,
    seeds_html,
    seeds_markdown,
)
from supanalysis.planted import DENSITY_TARGET, REPRESENTED_CORR
from supanalysis.planted_data import NO_FEATURE, PlantedSpec, absent_features, family_streams, generate, indicators

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _windows(tok: np.ndarray, spec: PlantedSpec) -> tuple[np.ndarray, np.ndarray]:
    """Trigger positions with a whole window after them, and the feature of each."""
    at = np.nonzero(tok >= spec.background)[0]
    at = at[at + spec.window < tok.size]
    return at, tok[at].astype(np.int64) - spec.background


def test_generator_plants_context_windows_at_their_densities():
    spec = PlantedSpec(n_features=8, p_min=1e-3, p_max=0.1, background=16, window=6)
    tok, lab = generate(spec, 2_000_000, seed=1)
    assert tok.shape == lab.shape == (2_000_000,)
    assert int(tok.max()) < spec.vocab_size == 24
    p = spec.densities
    assert p[0] == pytest.approx(0.1) and p[-1] == pytest.approx(1e-3) and spec.decades == pytest.approx(2.0)
    realised = np.bincount(lab[lab >= 0], minlength=8) / lab.size
    # A window is w labels at once: binomial noise of the windows, 4 standard errors.
    assert np.all(np.abs(realised - p) <= 4 * np.sqrt(spec.window * p / lab.size)), (realised, p)
    # Every trigger opens exactly w positions of its feature; triggers themselves are unlabelled.
    at, f = _windows(tok, spec)
    assert np.all(lab[at] == NO_FEATURE)
    for j in range(1, spec.window + 1):
        assert np.all(lab[at + j] == f)
    assert (lab >= 0).sum() == pytest.approx(spec.window * at.size, abs=spec.window)
    # Inside f's window the tokens follow the background's Zipf law rotated by s_f.
    for g in range(spec.n_features):
        inside = tok[(at[f == g, None] + 1 + np.arange(spec.window)).reshape(-1)]
        assert np.bincount(inside, minlength=spec.background).argmax() == spec.rotation(g)
    bg = np.bincount(tok[(lab == NO_FEATURE) & (tok < spec.background)], minlength=spec.background)
    assert bg.argmax() == 0 and bg[0] > 5 * bg[-1]
    np.testing.assert_array_equal(generate(spec, 1000, seed=1)[0], tok[:1000])  # seeded


def test_indicators():
    ind = indicators(np.array([-1, 2, 0, -1]), 3)
    np.testing.assert_array_equal(ind, [[0, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"p_min": 0.0}, "p_min"),
        ({"p_min": 0.2, "p_max": 0.1}, "p_min"),
        ({"n_features": 0}, "n_features"),
        ({"n_features": 30, "p_max": 0.3, "background": 40}, "at most 0.8"),
        ({"n_features": 40}, "background - 1"),
        ({"window": 0}, "window"),
        ({"zipf_exponent": -1.0}, "zipf_exponent"),
    ],
)
def test_spec_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PlantedSpec(**kwargs)
    with pytest.raises(ValueError, match="n_tokens"):
        generate(PlantedSpec(), 0)


def test_family_streams_universal_mode_plants_every_feature_everywhere():
    spec = PlantedSpec(n_features=8, p_min=2e-3, p_max=0.05, background=16)
    fs = family_streams(spec, "universal", 300_000, 100_000, seed=2)
    assert fs.absent == () and absent_features(spec, "universal") == ()
    for lab in (fs.labels_b, fs.test_labels):
        assert set(np.unique(lab[lab >= 0])) == set(range(8))
    assert fs.train_a.shape == fs.train_b.shape == (300_000,) and fs.test.shape == fs.test_labels.shape == (100_000,)
    # A's training stream and the test tokens are one draw (train | test); B's is another.
    tok, lab = generate(spec, 400_000, seed=2)
    np.testing.assert_array_equal(fs.train_a, tok[:300_000])
    np.testing.assert_array_equal(fs.test_labels, lab[300_000:])
    assert not np.array_equal(fs.train_a, fs.train_b)
    # Deterministic for a seed.
    again = family_streams(spec, "universal", 300_000, 100_000, seed=2)
    np.testing.assert_array_equal(again.train_b, fs.train_b)


def test_family_streams_non_universal_mode_strips_half_the_contexts_from_b_only():
    spec = PlantedSpec(n_features=8, p_min=2e-3, p_max=0.05, background=16, window=6)
    fs = family_streams(spec, "non-universal", 300_000, 100_000, seed=3)
    assert fs.absent == absent_features(spec, "non-universal") == (1, 3, 5, 7)
    # In B's training tokens the absent features' triggers keep their rates...
    at_b, f_b = _windows(fs.train_b, spec)
    f_a = _windows(fs.train_a, spec)[1]
    for g in range(8):
        assert abs(np.mean(f_b == g) - np.mean(f_a == g)) <= 4 * np.sqrt(np.mean(f_a == g) / f_a.size) + 1e-3
    # ...but open no context: nothing is labelled, and the window is plain background (rank 0 on top).
    assert set(np.unique(fs.labels_b[fs.labels_b >= 0])) == {0, 2, 4, 6}
    for g in fs.absent:
        inside = fs.train_b[(at_b[f_b == g, None] + 1 + np.arange(spec.window)).reshape(-1)]
        assert np.bincount(inside, minlength=spec.background).argmax() == 0
    # A's training tokens and the test tokens every model is measured on hold every context.
    assert set(np.unique(fs.test_labels[fs.test_labels >= 0])) == set(range(8))
    assert set(np.unique(_windows(fs.test, spec)[1])) == set(range(8))
    # The present features keep their planted densities in B's stream (4 standard errors).
    p, n = spec.densities, fs.labels_b.size
    realised = np.bincount(fs.labels_b[fs.labels_b >= 0], minlength=8) / n
    present = [0, 2, 4, 6]
    assert np.all(np.abs(realised[present] - p[present]) <= 4 * np.sqrt(spec.window * p[present] / n)), realised
    # A's stream and the test tokens are the universal mode's, so family A is the same in both modes.
    uni = family_streams(spec, "universal", 300_000, 100_000, seed=3)
    np.testing.assert_array_equal(uni.train_a, fs.train_a)
    np.testing.assert_array_equal(uni.test, fs.test)
    with pytest.raises(ValueError, match="mode"):
        absent_features(spec, "sometimes")
    with pytest.raises(ValueError, match="absent"):
        generate(spec, 10, absent=(8,))


def _row(truth: str, outcome: str | None, u: float | None) -> dict:
    return {"truth": truth, "outcome": outcome, "correct": outcome == EXPECTED[truth], "U_min": u}


def test_confusion_table_counts_truth_against_verdict():
    rows = [_row("universal", "universal_within_reproducibility", 0.95)] * 9
    rows += [_row("universal", "non_universal_features", 0.7)]
    rows += [_row("non-universal", "non_universal_features", 0.5)] * 8
    rows += [_row("non-universal", "universal_within_reproducibility", 0.9), _row("non-universal", None, None)]
    t = confusion_table(rows)
    assert t["matrix"]["universal"] == {"universal_within_reproducibility": 9, "non_universal_features": 1, "none": 0}
    assert t["matrix"]["non-universal"] == {
        "universal_within_reproducibility": 1,
        "non_universal_features": 8,
        "none": 1,
    }
    assert t["runs"] == {"universal": 10, "non-universal": 10}
    assert t["correct"] == {"universal": 9, "non-universal": 8}
    assert t["mean_U_min"]["universal"] == pytest.approx((9 * 0.95 + 0.7) / 10)
    assert t["mean_U_min"]["non-universal"] == pytest.approx((8 * 0.5 + 0.9) / 9)  # the missing U is left out
    # Full target: 9/10 per side; the non-universal side has 8, so it fails, and passes with one more.
    ok, why = meets_target(t, quick=False)
    assert not ok and "non-universal: 8/10" in why
    rows[-1] = _row("non-universal", "non_universal_features", 0.4)
    assert meets_target(confusion_table(rows), quick=False)[0]
    # Quick target: the direction, judged on mean U_min.
    assert meets_target(t, quick=True)[0]
    flipped = [_row("universal", "universal_within_reproducibility", 0.5), _row("non-universal", "x", 0.8)]
    assert not meets_target(confusion_table(flipped), quick=True)[0]
    above_one = [_row("universal", "universal_within_reproducibility", 1.3), _row("non-universal", "x", 1.1)]
    assert not meets_target(confusion_table(above_one), quick=True)[0]
    assert not meets_target(confusion_table(rows[:10]), quick=True)[0]  # a mode without runs
    assert not meets_target(confusion_table([_row("universal", None, None), _row("non-universal", None, None)]), True)[
        0
    ]


def test_seeds_markdown_and_judge_run():
    result = {
        "mode": "non-universal",
        "seed": 10,
        "seconds": {"total": 12.0},
        "summary": {
            "universality": {"verdict": {"outcome": "non_universal_features", "calibrated": True,
                                         "U_min": {"value": 0.55, "lo": 0.4, "hi": 0.7, "n": 20, "level": 0.95}}},
            "matching": {"pairs": [{"planted_matched": 5, "planted_matched_absent": 1}]},
            "density": {"median_rel_error": 0.1},
        },
    }  # fmt: skip
    r = judge_run(result)
    assert r["correct"] and r["U_min"] == 0.55 and r["U_min_hi"] == 0.7 and r["planted_matched_absent"] == 1
    uni = judge_run(result | {"mode": "universal"})
    assert not uni["correct"]
    t = confusion_table([r | {"folder": "a"}, uni | {"folder": "b"}])
    ok, why = meets_target(t, quick=False)
    summary = {"seeds": 1, "quick": False, "table": t, "meets_target": ok, "target": why,
               "runs": [r | {"folder": "a"}, uni | {"folder": "b<x>"}]}  # fmt: skip
    md = seeds_markdown(summary)
    assert "| non-universal | 0 | 1 | 0 | 1/1 | 0.55 |" in md and "**NOT met**" in md
    assert "`supanalysis planted --seeds 1`" in md and "[a](a/planted.md)" in md
    page = seeds_html(summary)
    assert "<td>non-universal</td><td>0</td><td>1</td><td>0</td><td>1/1</td><td>0.55</td>" in page
    assert "supanalysis planted --seeds 1" in page and "<b>NOT met</b>" in page
    assert '<a href="a/report.html">a</a>' in page and "b&lt;x&gt;" in page and "b<x>" not in page  # escaped


def _fake_result(seed: int, mode: str, quick: bool = True) -> dict:
    verdict = {"outcome": EXPECTED[mode], "calibrated": True, "U_min": {"value": 0.9, "lo": 0.8, "hi": 1.0}}
    return {"seed": seed, "mode": mode, "quick": quick, "seconds": {"total": 1.0},
            "summary": {"universality": {"verdict": verdict}, "matching": {"pairs": []},
                        "density": {"median_rel_error": None}}}  # fmt: skip


def test_run_seeds_resumes_from_finished_runs(tmp_path, monkeypatch):
    # An interrupted --seeds N resumes: runs whose planted.json is there are read back, the
    # others are run; a planted.json of another run, or one failing its checksum, is refused.
    import supanalysis.planted as planted
    from supanalysis.durable import with_checksum

    ran = []

    def fake_run(folder, size, seed, progress, mode, shared):
        ran.append((seed, mode))
        return _fake_result(seed, mode), object()

    monkeypatch.setattr(planted, "run_planted_mode", fake_run)
    done = tmp_path / "seed-0" / "universal"
    done.mkdir(parents=True)
    (done / "planted.json").write_text(json.dumps(with_checksum(_fake_result(0, "universal"))))
    summary = run_seeds(str(tmp_path), 2, quick=True, progress=False)
    assert ran == [(0, "non-universal"), (10, "universal"), (10, "non-universal")]
    assert [(r["seed"], r["truth"]) for r in summary["runs"]] == [
        (0, "universal"), (0, "non-universal"), (10, "universal"), (10, "non-universal")]  # fmt: skip
    assert summary["table"]["correct"] == {"universal": 2, "non-universal": 2}
    assert finished_run(str(done), 0, "universal", True)["seed"] == 0
    assert finished_run(str(tmp_path / "nowhere"), 0, "universal", True) is None
    with pytest.raises(ValueError, match="holds a run of"):
        finished_run(str(done), 10, "universal", True)  # another seed
    with pytest.raises(ValueError, match="holds a run of"):
        finished_run(str(done), 0, "universal", False)  # another size
    (done / "planted.json").write_text((done / "planted.json").read_text().replace('"seed": 0', '"seed": 20'))
    with pytest.raises(ValueError, match="fails its checksum"):
        run_seeds(str(tmp_path), 1, quick=True, progress=False)
    (done / "planted.json").write_text("{")
    with pytest.raises(ValueError, match=r"not valid UTF-8 JSON.*run that seed again"):
        finished_run(str(done), 0, "universal", True)


@pytest.fixture(scope="module")
def quick_seed(tmp_path_factory):
    """One quick seed of both plantings, run once for the tests below: (folder, summary)."""
    out = tmp_path_factory.mktemp("planted")
    return out, run_seeds(str(out), 1, quick=True, progress=False)


def test_quick_planted_seeds_run_compares_both_plantings_with_the_truth(quick_seed):
    # One seed of each planting mode at the quick size: a family of four TinyTransformers (two
    # shapes of equal 12·L·d², two seeds each) on planted data, a TopK SAE per site, one
    # run_test, then the comparison with the planted truth and the confusion table.
    #
    # What the quick size supports is asserted: the comparison is made and is consistent, the
    # universal family's dictionaries match far above chance, the contexts family B never
    # learnt are not matched across the models, and the direction of U between the two plantings
    # (non-universal below universal, and below 1). Whether each run's verdict is right needs
    # the full size (docs/planted.md); the confusion table's logic is tested on hand-made runs above.
    tmp_path, summary = quick_seed
    assert summary["meets_target"] is True, summary["target"]
    t = summary["table"]
    assert t["runs"] == {"universal": 1, "non-universal": 1}
    assert t["mean_U_min"]["non-universal"] < t["mean_U_min"]["universal"], t
    for row in summary["runs"]:
        r = json.loads((tmp_path / row["folder"] / "planted.json").read_text())
        _check_run(r, tmp_path / row["folder"])
        for p in r["summary"]["matching"]["pairs"]:
            # Truth 0; measured 0-1 of 8 over five quick seeds (the densest absent context, whose
            # most likely token is common in its windows, can pass τ through that token).
            assert p["planted_matched_absent"] <= 1, p
            if r["mode"] == "universal":
                assert p["matched_fraction_a"] >= p["baseline_fraction_a"] + 0.1, p
    assert json.loads((tmp_path / "planted.json").read_text())["table"] == json.loads(json.dumps(t))
    assert "| truth \\ verdict |" in (tmp_path / "planted.md").read_text()
    assert "<th>truth \\ verdict</th>" in (tmp_path / "planted.html").read_text()


def test_retest_tests_the_trained_families_again_without_training(quick_seed, tmp_path, monkeypatch):
    import supanalysis.planted as planted

    src, summary = quick_seed
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)  # config.json still names src's models

    def no_training(*args, **kwargs):
        raise AssertionError("a retest must not train")

    monkeypatch.setattr(planted, "prepare_planted", no_training)
    again = run_seeds(str(tmp_path), 1, quick=True, progress=False, retest=True)
    assert [r["retested"] for r in again["runs"]] == [True, True]
    assert not any(r["retested"] for r in summary["runs"])
    for before, after in zip(summary["runs"], again["runs"]):
        # The same families and the same analysis: the same verdict and U, to the bit.
        assert {k: after[k] for k in ("outcome", "U_min", "U_min_lo", "U_min_hi", "planted_matched")} == {
            k: before[k] for k in ("outcome", "U_min", "U_min_lo", "U_min_hi", "planted_matched")}  # fmt: skip
        r = json.loads((tmp_path / after["folder"] / "planted.json").read_text())
        assert r["retested"] is True and r["dictionaries"] and r["train_loss"]
        _check_run(r, tmp_path / after["folder"])
    assert "tested again on their trained families" in (tmp_path / "planted.md").read_text()
    # Without --retest the retested runs are read back as they are.
    assert run_seeds(str(tmp_path), 1, quick=True, progress=False)["runs"] == again["runs"]
    # A family whose models are gone is refused, naming what is missing.
    cfg = json.loads((tmp_path / "seed-0" / "universal" / "config.json").read_text())
    cfg["models"][0]["path"] = cfg["model_a"]["path"] = str(tmp_path / "gone")
    (tmp_path / "seed-0" / "universal" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((FileNotFoundError, ValueError), match="gone"):
        run_seeds(str(tmp_path), 1, quick=True, progress=False, retest=True)


def _check_run(r: dict, folder) -> None:
    """One run's planted.json is consistent with itself and its files."""
    d = r["summary"]["density"]
    assert d["at_tau"] >= 1, d
    errors = []
    for site in r["sites"]:
        for f in site["features"]:
            assert f["represented"] == (f["corr"] >= REPRESENTED_CORR)
            assert f["rel_error"] == pytest.approx(abs(f["p_measured"] / f["p_planted"] - 1), rel=1e-12)
            if f["represented"]:
                errors.append(f["rel_error"])
    if errors:
        assert d["median_rel_error"] == pytest.approx(float(np.median(errors)), rel=1e-12)
    assert d["pass"] == (bool(errors) and d["median_rel_error"] < DENSITY_TARGET)
    assert r["absent_features"] == list(absent_features(PlantedSpec(**{k: r["planted"][k] for k in (
        "n_features", "p_min", "p_max", "background", "zipf_exponent", "window")}), r["mode"]))  # fmt: skip
    # P1 holds by construction (equal 12·L·d²), and the outputs are all there.
    n = [m["non_embedding_params"] for m in r["models"].values()]
    assert abs(n[0] - n[1]) / max(n) <= 0.05
    # The primary pair's dictionaries carry their dictionary-seed ceiling; the others do not.
    for d in r["dictionaries"]:
        c = d.get("seed_ceiling")
        assert (c is not None) == (d["model"] in ("A0", "B0")), d
        if c is not None:
            assert 0.0 <= c["lo"] <= c["value"] <= c["hi"] <= 1.0, c
    md = (folder / "planted.md").read_text()
    assert "## Dictionaries" in md and "seed ceiling" in md
    assert "Planted ground truth" in md and ("**pass**" in md or "**FAIL**" in md)
    assert (folder / "report.json").is_file() and (folder / "config.json").is_file()
