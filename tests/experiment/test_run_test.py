"""run_test end to end on tiny models: known answers, reproducibility, bad configs."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from pair_config import pair_config, tiny

from supanalysis import science as S
from supanalysis.cli import main
from supanalysis.config import ModelSpec, SAETraining, TestConfig, Thresholds
from supanalysis.experiment import analyse, measure, measuring, pair_by_depth, run_test
from supanalysis.models import TinyTransformer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_test")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=40_000).astype(np.uint16)
    np.save(root / "tokens.npy", tokens)
    tiny(1, 16, 0).save(root / "A")
    tiny(4, 8, 1).save(root / "B")
    return root


def config(root, **kw):
    return pair_config(root, **{"stats_tokens": 2000, "bootstrap": 100, **kw})


def test_pair_by_depth():
    assert pair_by_depth([0, 1], 2, [0, 1, 2, 3, 4, 5, 6, 7], 8) == [(0, 3), (1, 7)]
    assert pair_by_depth([0, 1, 2, 3], 4, [0], 1) == [(3, 0)]
    assert pair_by_depth([0], 1, [0, 1, 2, 3], 4) == [(0, 3)]


def test_identical_models_match_perfectly(workspace):
    # The same model on both sides: every neuron's best match is itself, correlation 1,
    # and every matched pair has the same density (ln ratio exactly 0).
    cfg = config(workspace, model_b=ModelSpec(path=str(workspace / "A"), name="A copy"))
    rep = run_test(cfg, progress=False).data
    (pair,) = rep["pairs"]
    assert pair["matched_fraction_a"] == 1.0 and pair["matched_fraction_b"] == 1.0
    assert pair["mean_max_corr_a"] == pytest.approx(1.0, abs=1e-6)  # float32 products
    assert pair["median_log_ratio"]["value"] == 0.0
    assert pair["baseline_fraction_a"] < 0.2  # shuffled tokens: little beyond chance
    assert rep["premises"][0]["holds"] and not rep["premises"][2]["holds"]  # same neuron counts
    assert rep["verdict"]["outcome"] == S.PREMISES_NOT_MET
    json.dumps(rep, allow_nan=False)  # the schema forbids NaN


def test_bf16_match_precision_end_to_end(workspace):
    """match_precision="bf16" reaches the co-moments (dense and tiled) and the report's config:
    the same model on both sides still matches itself, correlations within bfloat16 rounding."""
    cfg = config(workspace, model_b=ModelSpec(path=str(workspace / "A"), name="A copy"), match_precision="bf16")
    rep = run_test(cfg, progress=False).data
    (pair,) = rep["pairs"]
    assert rep["config"]["match_precision"] == "bf16"
    assert pair["matched_fraction_a"] == 1.0 and pair["matched_fraction_b"] == 1.0
    assert pair["mean_max_corr_a"] == pytest.approx(1.0, abs=4 * 2**-9)
    # Rounded (measured 1 - 4.8e-5), not the float32 result (1 to ~1e-7); tiled agrees with dense.
    assert pair["mean_max_corr_a"] != pytest.approx(1.0, abs=2e-6)
    tiled, _ = analyse(measure(replace(cfg, match_max_bytes=8 * 16 * 3), progress=False))  # row blocks of 3
    assert tiled["pairs"][0]["match_mode"] == "tiled"
    assert tiled["pairs"][0]["mean_max_corr_a"] == pytest.approx(pair["mean_max_corr_a"], abs=5e-7)


def test_measure_once_analyse_many(workspace):
    meas = measure(config(workspace), progress=False)
    r1, arrays = analyse(meas)
    r2, _ = analyse(meas, Thresholds(tau=0.99, phi=0.9))
    assert r1["config"]["thresholds"]["tau"] == 0.5 and r2["config"]["thresholds"]["tau"] == 0.99
    assert r2["pairs"][0]["matched_fraction_a"] <= r1["pairs"][0]["matched_fraction_a"]
    # Aspect ratios 16/1 and 8/4: depth pairing gives A's only layer with B's last.
    assert [(p["site_a"], p["site_b"]) for p in r1["pairs"]] == [("resid_post.0", "resid_post.3")]
    assert len(r1["any_layer"]) == 1 and len(r1["any_layer"][0]["mean_max_corr"]) == 4
    assert rep_keys(r1) >= {"verdict", "premises", "models", "per_model", "sites", "pairs", "any_layer", "notes"}
    assert arrays["density/A/resid_post.0"].shape == (16,)
    a, b = r1["models"]["A"], r1["models"]["B"]
    assert a["kaplan_params"] == 12 * 1 * 16**2 and b["kaplan_params"] == 12 * 4 * 8**2
    assert a["eval_loss"]["lo"] <= a["eval_loss"]["value"] <= a["eval_loss"]["hi"]
    assert r1["per_model"]["A"]["neurons_total"] == 16 and r1["per_model"]["B"]["neurons_total"] == 32


def rep_keys(r):
    return set(r)


def test_densities_of_planted_features(workspace):
    # A dictionary whose latents copy a neuron and fire exactly when it is positive: the
    # measured densities must equal the neuron's positive fraction computed by hand.
    from supanalysis.capture import capture
    from supanalysis.dictionary import Dictionary, save_dictionary

    model = TinyTransformer.load(workspace / "A")
    d = Dictionary(16, 16, "relu")
    with torch.no_grad():
        d.W_enc.copy_(torch.eye(16))
        d.W_dec.copy_(torch.eye(16))
    save_dictionary(d, workspace / "dict_a" / "resid_post.0")
    cfg = config(workspace, model_a=ModelSpec(path=str(workspace / "A"), dictionary=str(workspace / "dict_a")))
    meas = measure(cfg, progress=False)
    got = meas.a.sites[0].stats.density
    # Hand computation over the same statistics tokens (they follow eval: 1000 tokens -> 33 sequences).
    toks = torch.from_numpy(np.load(workspace / "tokens.npy").astype(np.int64))
    start = 33 * 32
    ids = toks[start : start + 2000 // 32 * 32 + 32].reshape(-1, 32)[: 2000 // 32 + 1]
    with capture(model, ["resid_post.0"]) as cache, torch.no_grad():
        model(ids)
    x = cache["resid_post.0"].reshape(-1, 16)[:2000]
    assert torch.allclose(got, (x > 0).double().mean(0), atol=1e-12)
    rep, _ = analyse(meas)
    # ReLU codes of an identity dictionary reconstruct relu(x): FVU = Σ min(x, 0)² / Σ (x − x̄)².
    x64 = x.double()
    want = float((x64.clamp(max=0) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum())
    assert rep["sites"]["A"][0]["fvu"] == pytest.approx(want, rel=1e-6)


def test_bad_configs_fail_clearly(workspace, tmp_path):
    with pytest.raises(FileNotFoundError, match="model A folder not found"):
        measure(config(workspace, model_a=ModelSpec(path=str(tmp_path / "nope"))), progress=False)
    with pytest.raises(ValueError, match=r"site 'resid_post\.9': layer 9 out of range"):
        measure(config(workspace, model_a=ModelSpec(path=str(workspace / "A"), sites=["resid_post.9"])), progress=False)
    np.save(tmp_path / "floats.npy", np.zeros(100, dtype=np.float32))
    with pytest.raises(ValueError, match="integers"):
        measure(config(workspace, tokens=str(tmp_path / "floats.npy")), progress=False)
    with pytest.raises(ValueError, match="this config needs"):
        measure(config(workspace, stats_tokens=10**6, match_tokens=10), progress=False)
    from supanalysis.dictionary import Dictionary, save_dictionary

    save_dictionary(Dictionary(8, 32, "relu"), tmp_path / "wrong" / "resid_post.0")
    with pytest.raises(ValueError, match=r"d_in=8, but site 'resid_post\.0' has 16 neurons"):
        measure(config(workspace, model_a=ModelSpec(path=str(workspace / "A"), dictionary=str(tmp_path / "wrong"))))
    with pytest.raises(ValueError, match="unknown key"):
        TestConfig.from_dict({"model_a": {"path": "x"}, "colour": "red"})


def test_cli_test_writes_report_and_rejects_bad_input(workspace, tmp_path, capsys):
    cfg = config(workspace)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "out"
    assert main(["test", "--config", str(path), "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["schema"] == "supanalysis.test_report/1"
    assert (out / "report.html").read_text().find(rep["verdict"]["outcome"]) >= 0
    # Same config and seed -> the same numbers.
    again = run_test(copy.deepcopy(cfg), progress=False).data
    assert again["pairs"] == rep["pairs"] and again["sites"] == rep["sites"]
    bad = tmp_path / "bad"
    rc = main(["test", "--model-a", str(tmp_path / "missing"), "--model-b", str(workspace / "B"),
               "--tokens", str(workspace / "tokens.npy"), "--out", str(bad)])  # fmt: skip
    assert rc != 0 and not bad.exists()
    assert "not found" in capsys.readouterr().err


class TokenShuffledCopy(TinyTransformer):
    """The same weights, fed a fixed permutation of every sequence's positions: its
    activation at position t belongs to another token, so nothing beyond chance aligns."""

    def forward(self, ids):
        perm = torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(7))
        return super().forward(ids[:, perm])


def test_token_shuffled_copy_matches_at_baseline(workspace):
    # Without position embeddings (which a position-keeping shuffle would leave aligned), the
    # copy's activation at each position belongs to another token and context.
    a = TinyTransformer.load(workspace / "A")
    with torch.no_grad():
        a.pos_embed.weight.zero_()
    b = TokenShuffledCopy(a.config)
    b.load_state_dict(a.state_dict())
    cfg = config(workspace, model_a=ModelSpec(name="A"), model_b=ModelSpec(name="A, shuffled tokens"))
    rep, _ = analyse(measure(cfg, model_a=a, model_b=b.eval(), progress=False), Thresholds(tau=0.5))
    (pair,) = rep["pairs"]
    identical, _ = analyse(measure(cfg, model_a=a, model_b=a, progress=False))
    assert identical["pairs"][0]["matched_fraction_a"] == 1.0
    assert pair["matched_fraction_a"] <= pair["baseline_fraction_a"] + 0.15
    assert abs(pair["mean_max_corr_a"] - pair["baseline_mean_max_corr_a"]) < 0.15


def test_tiled_matching_beyond_the_memory_budget_equals_dense(workspace, tmp_path):
    # A trained TopK SAE on A (sparse codes) against B's neurons (dense), any-layer matching.
    cfg = config(
        workspace,
        model_a=ModelSpec(path=str(workspace / "A"), name="A", dictionary="train"),
        sae=SAETraining(expansion=2, k=4, tokens=2048, batch_size=256),
    )
    dense, _ = analyse(measure(cfg, progress=False))
    # The biggest pair is 32 x 8 co-moment entries: a 100-byte budget forces row blocks of 1.
    small = replace(cfg, match_max_bytes=100)
    meas = measure(small, progress=False)
    tiled, _ = analyse(meas)
    assert all(p["match_mode"] == "dense" for p in dense["pairs"])
    assert all(p["match_mode"] == "tiled" for p in tiled["pairs"])
    assert all(pm.corr.passes > 1 for pm in meas.pairs)
    for d, t in zip(dense["pairs"], tiled["pairs"]):
        assert d["tokens"] == t["tokens"]
        for key in ("mean_max_corr_a", "mean_max_corr_b", "baseline_mean_max_corr_a", "baseline_mean_max_corr_b"):
            assert t[key] == pytest.approx(d[key], abs=1e-5), key
        for key in ("matched_fraction_a", "matched_fraction_b", "baseline_fraction_a", "baseline_fraction_b"):
            assert t[key] == pytest.approx(d[key], abs=0.05), key
    assert [r["best_site_b"] for r in tiled["any_layer"]] == [r["best_site_b"] for r in dense["any_layer"]]
    # Interrupted mid-pass and resumed, the kept codes come back from the checkpoint.
    real, calls = measuring.site_updates, [0]

    def failing(*args):
        calls[0] += 1
        if calls[0] == 9:
            raise KeyboardInterrupt
        return real(*args)

    ck = tmp_path / "ck"
    measuring.site_updates = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            measure(small, progress=False, checkpoint_dir=ck, checkpoint_every_tokens=256)
    finally:
        measuring.site_updates = real
    resumed, _ = analyse(measure(small, progress=False, checkpoint_dir=ck, resume=True))
    assert resumed["pairs"] == tiled["pairs"] and resumed["any_layer"] == tiled["any_layer"]


def test_report_keys_are_the_row_fields_in_order(workspace):
    from supanalysis.experiment import rows

    rep, _ = analyse(measure(config(workspace), progress=False))
    assert tuple(rep) == rows.REPORT_FIELDS
    assert tuple(rep["library"]) == rows.LIBRARY_FIELDS
    assert tuple(rep["verdict"]) == rows.VERDICT_FIELDS
    assert all(tuple(p) == rows.PREMISE_FIELDS for p in rep["premises"])
    for label in ("A", "B"):
        assert tuple(rep["models"][label]) == rows.MODEL_FIELDS
        assert tuple(rep["models"][label]["eval_loss"]) == rows.ESTIMATE_FIELDS
        assert tuple(rep["per_model"][label]) == rows.PER_MODEL_FIELDS
        assert all(tuple(s) == rows.SITE_FIELDS for s in rep["sites"][label])
    assert rep["pairs"] and all(tuple(p) == rows.PAIR_FIELDS for p in rep["pairs"])
    assert all(tuple(p["verdict"]) == rows.VERDICT_FIELDS for p in rep["pairs"])
    assert rep["any_layer"] and all(tuple(r) == rows.ANY_LAYER_FIELDS for r in rep["any_layer"])
