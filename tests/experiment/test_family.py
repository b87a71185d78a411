"""A family of models (two shapes x two seeds): config forms, ceilings, U, calibration, P4."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from pair_config import tiny

from supanalysis import science as S
from supanalysis.calibration import NON_UNIVERSAL
from supanalysis.config import ModelSpec, SAETraining, TestConfig, Thresholds
from supanalysis.experiment import analyse, measure, run_test

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    tokens = np.random.default_rng(0).integers(0, 64, size=30_000).astype(np.uint16)
    np.save(root / "tokens.npy", tokens)
    for name, (L, d, seed) in {"A": (1, 16, 0), "A2": (1, 16, 1), "B": (2, 8, 2), "B2": (2, 8, 3)}.items():
        tiny(L, d, seed).save(root / name)
    return root


def family_config(root, folders=("A", "A2", "B", "B2"), **kw):
    shapes = {"A": "wide", "A2": "wide", "B": "deep", "B2": "deep"}
    models = [
        ModelSpec(path=str(root / f), name=f"{f}-{n}", shape=shapes[f], seed=str(n)) for n, f in enumerate(folders)
    ]
    base = dict(models=models, tokens=str(root / "tokens.npy"), seq_len=32, batch_size=8, eval_tokens=600,
                stats_tokens=2000, match_tokens=2000, bootstrap=100)  # fmt: skip
    base.update(kw)
    return TestConfig(**base)


def test_family_config_forms(tmp_path):
    toml = tmp_path / "family.toml"
    toml.write_text(
        'tokens = "t.npy"\n'
        '[[models]]\npath = "a0"\nshape = "wide"\nseed = "0"\n'
        '[[models]]\npath = "a1"\nshape = "wide"\nseed = "1"\n'
        '[[models]]\npath = "b0"\nshape = "deep"\n'
    )
    cfg = TestConfig.load(toml)
    assert [s.path for s in cfg.model_specs()] == [str(tmp_path / p) for p in ("a0", "a1", "b0")]
    assert cfg.primary_pair() == (0, 2)
    assert cfg.model_a is cfg.models[0] and cfg.model_b is cfg.models[2]
    assert TestConfig.from_dict(cfg.to_dict()) == cfg  # the saved config.json loads back
    pair = tmp_path / "pair.json"
    pair.write_text(json.dumps({"tokens": "t.npy", "model_a": {"path": "a"}, "model_b": {"path": "b"}}))
    two = TestConfig.load(pair)
    assert two.models == [] and [s.path for s in two.model_specs()] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert two.primary_pair() == (0, 1)
    with pytest.raises(ValueError, match="differs from the family's primary pair"):
        TestConfig(models=cfg.models, model_a=ModelSpec(path="other"))
    with pytest.raises(ValueError, match="all of one shape"):
        TestConfig(models=[ModelSpec(name="x", shape="s"), ModelSpec(name="y", shape="s")])


@pytest.fixture(scope="module")
def family_report(workspace):
    # Random tiny models match little: at τ = 0.1 both ceilings match some latents, so U exists.
    return run_test(family_config(workspace, thresholds=Thresholds(tau=0.1)), progress=False).data


def test_four_models_fill_the_family_consistently(family_report):
    rep = family_report
    fam = rep["family"]
    assert [m["label"] for m in fam["models"]] == ["A", "A'", "B", "B'"]
    assert [m["shape"] for m in fam["models"]] == ["wide", "wide", "deep", "deep"]
    assert rep["models"]["A"]["name"] == "A-0" and rep["models"]["B"]["name"] == "B-2"  # the primary pair
    values = fam["matched_fraction_matrix"]["values"]
    assert all(values[k][k] is None for k in range(4))
    assert all(0.0 <= values[r][c] <= 1.0 for r in range(4) for c in range(4) if r != c)
    assert {(c["model_x"], c["model_y"]) for c in fam["ceilings"]} == {("A", "A'"), ("B", "B'")}
    (pair,) = rep["pairs"]  # A's one layer with B's last
    assert values[0][2] == pytest.approx(pair["matched_fraction_a"])
    assert values[2][0] == pytest.approx(pair["matched_fraction_b"])
    uni = pair["universality"]
    assert uni["calibrated"] and uni["U_a"] is not None and uni["U_b"] is not None
    rel = {(r["model"], r["into"]): r for r in fam["relative_universality"]}
    assert rel[("A", "B")]["ceiling_model"] == "A'" and rel[("B", "A")]["ceiling_model"] == "B'"
    assert rel[("A", "B")]["U"] == uni["U_a"] and rel[("B", "A")]["U"] == uni["U_b"]
    r = rel[("A", "B")]
    assert r["cross_fraction"] == pytest.approx(pair["matched_fraction_a"])
    assert r["U"]["value"] == pytest.approx(r["cross_fraction"] / r["ceiling_fraction"])
    ceiling_a = next(c for c in fam["ceilings"] if c["model_x"] == "A")
    assert ceiling_a["matched_fraction"]["value"] == pytest.approx(r["ceiling_fraction"])
    v = rep["verdict"]
    assert v["calibrated"] and v["universality"]["calibrated"]
    assert v["universality"]["outcome"] == uni["outcome"]
    # The verdict rests on U pooled over the family (both seeds of each shape): its U_min is the
    # smaller pooled U, and every depth pair carries that decision.
    pooled = {(r["shape"], r["into_shape"]): r for r in fam["pooled_universality"]}
    assert set(pooled) == {("wide", "deep"), ("deep", "wide")}
    assert pooled[("wide", "deep")]["models"] == ["A", "A'"] and pooled[("deep", "wide")]["into_models"] == ["A", "A'"]
    assert v["universality"]["U_min"] == min((p["U"] for p in pooled.values()), key=lambda u: u["value"])
    assert rep["premises"][-1]["name"] == "P4 adequate dictionaries" and rep["premises"][-1]["holds"]
    json.dumps(rep, allow_nan=False)


def test_same_weights_ceiling_makes_the_cross_pair_non_universal(workspace):
    # A' and B' are A's and B's own weights: each ceiling is exactly 1, and the cross-shape
    # pair, which matches less, is non-universal against it, calibrated on both sides.
    rep = run_test(family_config(workspace, folders=("A", "A", "B", "B")), progress=False).data
    ceilings = rep["family"]["ceilings"]
    assert ceilings and all(c["matched_fraction"]["value"] == 1.0 for c in ceilings)
    (pair,) = rep["pairs"]
    assert pair["matched_fraction_a"] < 0.9
    uni = pair["universality"]
    assert uni["calibrated"] and uni["outcome"] == NON_UNIVERSAL
    assert uni["U_a"]["hi"] < 1.0
    assert rep["verdict"]["universality"] == {**rep["verdict"]["universality"], "outcome": NON_UNIVERSAL,
                                              "calibrated": True}  # fmt: skip
    assert not rep["verdict"]["reason"].startswith("uncalibrated")


def test_two_models_are_uncalibrated(workspace):
    cfg = TestConfig(
        model_a=ModelSpec(path=str(workspace / "A"), name="A"), model_b=ModelSpec(path=str(workspace / "B"), name="B"),
        tokens=str(workspace / "tokens.npy"), seq_len=32, batch_size=8, eval_tokens=600, stats_tokens=2000,
        match_tokens=2000, bootstrap=100,
    )  # fmt: skip
    rep = run_test(cfg, progress=False).data
    assert rep["family"]["ceilings"] == [] and rep["family"]["relative_universality"] == []
    (pair,) = rep["pairs"]
    assert not pair["universality"]["calibrated"] and pair["universality"]["U_a"] is None
    v = rep["verdict"]
    assert not v["calibrated"] and v["reason"].startswith("uncalibrated: ")
    assert not v["universality"]["calibrated"] and v["universality"]["U_min"] is None
    assert pair["verdict"]["reason"].startswith("uncalibrated: ")


def test_failing_p4_labels_the_verdict_without_replacing_it(workspace):
    cfg = family_config(workspace, models=[], model_a=ModelSpec(path=str(workspace / "A"), dictionary="train"),
                        model_b=ModelSpec(path=str(workspace / "B"), dictionary="train", sites=["resid_post.1"]),
                        sae=SAETraining(expansion=2, k=4, tokens=2000, batch_size=256))  # fmt: skip
    meas = measure(cfg, progress=False)
    loose = dict(params_tolerance=1.0, loss_tolerance=10.0)  # P1-P3 hold: only P4 decides
    ok, _ = analyse(meas, Thresholds(max_fvu=1.0, max_dead=1.0, **loose))
    bad, _ = analyse(meas, Thresholds(max_fvu=0.0, max_dead=0.0, **loose))
    assert all(p["holds"] for p in ok["premises"])
    p4_ok, p4_bad = ok["premises"][-1], bad["premises"][-1]
    assert p4_ok["name"] == p4_bad["name"] == "P4 adequate dictionaries"
    assert p4_ok["holds"] and not p4_bad["holds"]
    assert p4_bad["numbers"]["worst_fvu"] > 0
    assert bad["verdict"]["outcome"] == ok["verdict"]["outcome"] != S.PREMISES_NOT_MET
    assert "resting on inadequate dictionaries" in bad["verdict"]["reason"]
    assert "resting on inadequate dictionaries" not in ok["verdict"]["reason"]
    assert bad["pairs"][0]["universality"] == ok["pairs"][0]["universality"]  # the numbers stay visible
    assert bad["verdict"]["numbers"].get("inadequate_dictionaries") is True


def test_measurements_without_a_family_reanalyse_uncalibrated(workspace):
    meas = measure(family_config(workspace), progress=False)
    rep, _ = analyse(replace(meas, family=None))
    assert rep["family"] is None
    assert not rep["verdict"]["calibrated"] and rep["verdict"]["reason"].startswith("uncalibrated: ")
    assert all(not p["universality"]["calibrated"] for p in rep["pairs"])


def test_labelled_prefixes():
    v = S.Verdict(S.INCONCLUSIVE, "too wide")
    p4 = S.Premise("P4 adequate dictionaries", False, "FVU 0.3")
    out = S.labelled(v, False, p4)
    assert out.reason.startswith("uncalibrated: resting on inadequate dictionaries")
    assert S.labelled(out, True).reason.startswith("resting on")  # the prefix is not stacked
