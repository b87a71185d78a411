"""Matching over the family's depth grid: the cross-shape match and its ceiling offer the same
candidate depths, and the verdict pools each model's compared sites (docs/science.md, "Calibration")."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pair_config import tiny

from supanalysis.calibration import NON_UNIVERSAL, UNIVERSAL, ratio_of_means
from supanalysis.config import ModelSpec, TestConfig, Thresholds
from supanalysis.experiment import measure, run_test
from supanalysis.experiment.family import (
    BestMatches,
    FamilyAnalysis,
    pooled_rows,
    pooled_universality,
    relative_rows,
)
from supanalysis.experiment.measurements import FamilyMeasurement
from supanalysis.experiment.plan import family_grid, grid_pairs, grid_sites, model_grid_sites

N = 4  # latents per site; every one alive


def test_the_grid_is_the_shallowest_models_depths():
    wide, deep = ([0, 1], 2), (list(range(8)), 8)
    assert family_grid([deep, wide, deep]) == [0.5, 1.0]
    assert grid_sites(*deep, [0.5, 1.0]) == [3, 7]
    assert grid_sites(*wide, [0.5, 1.0]) == [0, 1]
    assert grid_sites([0, 1, 2, 3], 4, [0.625]) == [1]  # 0.5 and 0.75 tie: the shallower
    assert grid_pairs([0, 1], [3, 7]) == [(0, 3), (0, 7), (1, 3), (1, 7)]


def _model(n_layers: int) -> SimpleNamespace:
    sites = [
        SimpleNamespace(site=f"resid_post.{k}", layer=k, stats=SimpleNamespace(density=torch.full((N,), 0.1)))
        for k in range(n_layers)
    ]
    return SimpleNamespace(sites=sites, shape=SimpleNamespace(n_layers=n_layers))


class _Fixed:
    """A matcher whose best match is given: corr_x for the first model's latents, corr_y for the second's."""

    def __init__(self, corr_x: list[float], corr_y: list[float]) -> None:
        self.bm = SimpleNamespace(max_corr_a=torch.tensor(corr_x), max_corr_b=torch.tensor(corr_y))

    def best_match(self) -> SimpleNamespace:
        return self.bm


def _family(cross_ab: dict, cross_aa: dict, cross_bb: dict) -> FamilyMeasurement:
    """A (2 layers), A' (2), B (8), B' (8); every pair not given matches nothing."""
    models = [_model(2), _model(2), _model(8), _model(8)]
    none = [0.0] * N
    cross = {pair: {} for pair in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]}
    grid = model_grid_sites(models)
    for (x, y), given in [((0, 2), cross_ab), ((0, 1), cross_aa), ((2, 3), cross_bb)]:
        for i in range(len(models[x].sites)):
            for j in range(len(models[y].sites)):
                if (i, j) in given or (i in grid[x] and j in grid[y]) or ((x, y) == (2, 3) and i == j):
                    cross[(x, y)][(i, j)] = _Fixed(*given.get((i, j), (none, none)))
    for x, y in [(0, 3), (1, 2), (1, 3)]:
        for i in grid[x]:
            for j in grid[y]:
                cross[(x, y)][(i, j)] = _Fixed(none, none)
    return FamilyMeasurement(models, ["A", "A", "B", "B"], ["0", "1", "0", "1"], ["A", "A'", "B", "B'"], (0, 2), cross)


def _analyse(fm: FamilyMeasurement) -> tuple[list, FamilyAnalysis]:
    """The relative-universality rows and the analysis the verdict reads (U and pooled U)."""
    bms, cfg = BestMatches(fm, TH), TestConfig(bootstrap=200)
    rel, found, pooled = relative_rows(bms, cfg)
    _, by_pair = pooled_rows(bms, cfg, pooled)
    return rel, FamilyAnalysis(None, found, by_pair, list(fm.shapes))


TH = Thresholds(tau=0.5)
HIT, MISS = [0.9] * N, [0.1] * N


def test_a_match_at_the_other_grid_depth_counts_and_one_off_the_grid_does_not():
    # A's layer-0 latents recur in B only at B's layer 7 (grid, but not their depth partner 3),
    # and in A' at layer 0. B's layer-3 latents recur in A at layer 1 and in B' at layer 3.
    # An off-grid site of B (layer 5) matches everything: it must not count (B' offers none).
    fm = _family(
        cross_ab={(0, 3): (MISS, MISS), (0, 7): (HIT, MISS), (1, 3): (MISS, HIT), (0, 5): (HIT, HIT)},
        cross_aa={(0, 0): (HIT, HIT)},
        cross_bb={(3, 3): (HIT, HIT)},
    )
    bms = BestMatches(fm, TH)
    assert bms.grid == [[0, 1], [0, 1], [3, 7], [3, 7]]
    assert bms.candidates(0, 2, 0, 3) == [3, 7] and bms.candidates(2, 0, 3, 0) == [0, 1]
    rows, _ = _analyse(fm)
    rel = {(r.model, r.into, r.site): r for r in rows}
    a0 = rel[("A", "B", "resid_post.0")]
    assert a0.sites_into_matched == ["resid_post.3", "resid_post.7"]
    assert a0.sites_ceiling == ["resid_post.0", "resid_post.1"]
    assert (a0.cross_fraction, a0.ceiling_fraction, a0.U.value) == (1.0, 1.0, 1.0)
    b3 = rel[("B", "A", "resid_post.3")]
    assert b3.sites_into_matched == ["resid_post.0", "resid_post.1"]
    assert b3.sites_ceiling == ["resid_post.3", "resid_post.7"]
    assert b3.U.value == 1.0
    # A's layer 1 and B's layer 7 match nothing anywhere: no ceiling, no ratio at those sites.
    assert math.isnan(rel[("A", "B", "resid_post.1")].U.value)


def test_the_verdict_pools_every_seed_and_site_of_a_shape():
    # A's layer 0 recurs in B (at the other grid depth) and in A'; A's layer 1 recurs in A' only.
    # A' recurs in A at both layers and in neither B. B's latents recur in A and B' at both grid
    # sites. Pooled over A (sites 0, 1) and A' (sites 0, 1), each into B and B':
    # numerators 0.5 (A layer 0: in B, not in B') and 0 elsewhere -> 2 / 16 = 0.125 of a ceiling of 1.
    fm = _family(
        cross_ab={(0, 7): (HIT, HIT), (1, 3): (MISS, HIT)},
        cross_aa={(0, 0): (HIT, HIT), (1, 1): (HIT, HIT)},
        cross_bb={(3, 3): (HIT, HIT), (7, 7): (HIT, HIT)},
    )
    _, fam = _analyse(fm)
    pa, pb = fam.pooled[("A", "B")], fam.pooled[("B", "A")]
    assert pa.models == ["A", "A'"] and pa.into_models == ["B", "B'"]
    assert pa.sites == ["A resid_post.0", "A resid_post.1", "A' resid_post.0", "A' resid_post.1"]
    assert pb.sites == ["B resid_post.3", "B resid_post.7", "B' resid_post.3", "B' resid_post.7"]
    assert (pa.cross_fraction, pa.ceiling_fraction, pa.U.value, pa.U.n) == (0.125, 1.0, 0.125, 16)
    # B's latents: B layers 3, 7 in A (HIT), not in A' (nothing measured): 0.5 each; B' nowhere.
    assert pb.U.value == pytest.approx(0.25)
    best = BestMatches(fm, TH)
    into_b = [best.best_over(0, y, i, [3, 7]) for i in (0, 1) for y in (2, 3)]
    num = torch.stack(into_b).reshape(2, 2, N).ge(TH.tau).double().mean(1).flatten()
    num = torch.cat([num, torch.zeros(2 * N, dtype=torch.float64)])
    want = ratio_of_means(num, torch.ones(4 * N, dtype=torch.float64), n_boot=200, seed=0)
    assert (pa.U.value, pa.U.lo, pa.U.hi) == (want.value, want.lo, want.hi)
    d = pooled_universality(fam, (0, 2))
    assert d.decision.outcome == NON_UNIVERSAL and d.decision.calibrated and d.U_min == pa.U
    assert "pooled over every seed and compared site" in d.decision.reason


def test_every_grid_site_matched_everywhere_is_universal():
    everything = {(i, j): (HIT, HIT) for i in (0, 1) for j in (3, 7)}
    fm = _family(cross_ab=everything, cross_aa={(0, 0): (HIT, HIT), (1, 1): (HIT, HIT)},
                 cross_bb={(3, 3): (HIT, HIT), (7, 7): (HIT, HIT)})  # fmt: skip
    for pair in [(0, 3), (1, 2), (1, 3)]:  # every model of A matches every model of B
        fm.cross[pair] = {ij: _Fixed(HIT, HIT) for ij in fm.cross[pair]}
    d = pooled_universality(_analyse(fm)[1], (0, 2))
    assert d.decision.outcome == UNIVERSAL and d.U_min.value == 1.0


def test_measurements_without_the_grid_pairs_fall_back_to_the_depth_partner():
    fm = _family(cross_ab={(0, 3): (HIT, HIT)}, cross_aa={(0, 0): (HIT, HIT)}, cross_bb={(3, 3): (HIT, HIT)})
    del fm.cross[(0, 2)][(0, 7)]  # as a measurement made before the grid: only the depth pair
    bms = BestMatches(fm, TH)
    assert bms.candidates(0, 2, 0, 3) == [3]
    rel = {(r.model, r.into, r.site): r for r in _analyse(fm)[0]}
    assert rel[("A", "B", "resid_post.0")].sites_into_matched == ["resid_post.3"]
    assert rel[("A", "B'", "resid_post.0")].sites_into_matched == ["resid_post.3", "resid_post.7"]


@pytest.mark.parametrize("dead", [True, False])
def test_best_over_keeps_dead_latents_undefined(dead):
    fm = _family(cross_ab={(0, 3): (HIT, HIT), (0, 7): (MISS, MISS)}, cross_aa={}, cross_bb={})
    if dead:
        fm.models[0].sites[0].stats.density = torch.zeros(N)
    got = BestMatches(fm, TH).best_over(0, 2, 0, [3, 7])
    assert bool(got.isnan().all()) if dead else torch.equal(got, torch.full((N,), 0.9).double())


@pytest.mark.parametrize("any_layer", [False, True])
def test_the_family_pass_measures_every_pair_of_grid_sites(tmp_path, any_layer):
    tokens = np.random.default_rng(0).integers(0, 64, size=8_000).astype(np.uint16)
    np.save(tmp_path / "tokens.npy", tokens)
    shapes = {"A": (2, 16, 0), "A2": (2, 16, 1), "B": (4, 8, 2), "B2": (4, 8, 3)}
    for name, (L, d, seed) in shapes.items():
        tiny(L, d, seed).save(tmp_path / name)
    models = [ModelSpec(path=str(tmp_path / f), shape=f[0], seed=str(k)) for k, f in enumerate(shapes)]
    cfg = TestConfig(models=models, tokens=str(tmp_path / "tokens.npy"), seq_len=32, batch_size=8, eval_tokens=300,
                     stats_tokens=1000, match_tokens=1000, bootstrap=50, any_layer=any_layer,
                     thresholds=Thresholds(tau=0.1))  # random tiny models: both ceilings match some  # fmt: skip
    fm = measure(cfg, progress=False).family
    # A: layers 0, 1 (depths 1/2, 1); B: layers 0-3, its grid sites 1 and 3.
    depth = {(0, 1): [(0, 0), (1, 1)], (2, 3): [(0, 0), (1, 1), (2, 2), (3, 3)], (0, 2): [(0, 1), (1, 3)]}
    for (x, y), pairs in fm.cross.items():
        gx = [0, 1] if x < 2 else [1, 3]
        gy = [0, 1] if y < 2 else [1, 3]
        want = set(grid_pairs(gx, gy)) | set(depth.get((x, y), []))
        if (x, y) == (0, 2):
            want |= set(depth[(0, 2)])
        assert set(pairs) == want, (x, y)
        for cc in pairs.values():
            assert cc.n_tokens == 1000
    rep = run_test(cfg, progress=False).data
    pooled = {(r["shape"], r["into_shape"]): r for r in rep["family"]["pooled_universality"]}
    assert pooled[("A", "B")]["sites"] == [f"{m} resid_post.{k}" for m in ("A", "A'") for k in (0, 1)]
    assert pooled[("B", "A")]["sites"] == [f"{m} resid_post.{k}" for m in ("B", "B'") for k in (1, 3)]
    assert rep["verdict"]["universality"]["U_min"] in [pooled[("A", "B")]["U"], pooled[("B", "A")]["U"]]
    for r in rep["family"]["relative_universality"]:
        assert len(r["sites_into_matched"]) == len(r["sites_ceiling"]) == 2
