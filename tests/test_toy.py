"""Toy models of superposition: the published results reproduce (seeded, small, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from supanalysis.ops.interference import interference
from supanalysis.toy import ToyConfig, adjacent_angles, forward, sample_features, train_toy_models
from supanalysis.toy_tour import check_linear, check_pentagon, check_sticky

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_pentagon():
    # n=5 features in m=2 dims at density 0.05: a regular pentagon (Elhage et al.).
    models = train_toy_models(ToyConfig(5, 2, (0.05,), steps=600, seeds=4, seed=0))
    W = models.directions(0)
    r = interference(W)
    assert torch.all((r.dims - 0.4).abs() <= 0.02), r.dims
    assert r.sum_dims == pytest.approx(2.0, abs=0.02)  # a tight frame in R^2
    angles = adjacent_angles(W)
    assert torch.all((angles - 72.0).abs() <= 3.0), angles
    # Equal importance: the five arrows have (nearly) equal length.
    assert float(r.norms.max() - r.norms.min()) < 0.05
    assert check_pentagon(models, 0)["pass"]


def test_dense_pentagon_model_keeps_two_orthogonal_features():
    # The other end of the same sweep: at density 1 only m=2 features fit, orthogonally.
    models = train_toy_models(ToyConfig(5, 2, (1.0,), steps=2000, seeds=2, importance_decay=0.7, seed=0))
    r = interference(models.directions(0))
    kept = (r.norms > 0.5).nonzero().flatten().tolist()
    assert kept == [0, 1]
    assert torch.allclose(r.dims[:2], torch.ones(2, dtype=r.dims.dtype), atol=0.02)


def test_linear_model_learns_the_top_features_only():
    # Without the ReLU the optimum is PCA: exactly the m most important features, at norm 1.
    cfg = ToyConfig(20, 5, (1.0,), importance_decay=0.7, relu=False, steps=1000, lr=3e-2, seed=0)
    models = train_toy_models(cfg)
    norms = models.directions(0).norm(dim=1)
    assert torch.all((norms[:5] - 1.0).abs() <= 0.05), norms
    assert torch.all(norms[5:] < 0.05), norms
    res = check_linear(models, 5)
    assert res["pass"] and res["represented"] == [0, 1, 2, 3, 4]


def test_d_star_is_sticky_at_one_half():
    # n=200, m=20, uniform importance: D* = m / ||W||_F^2 is 1 for dense features, then
    # sticks at 1/2 (antipodal pairs) as the density falls, and keeps falling beyond.
    inv = (1.0, 2.5, 3.0, 3.5, 10.0)
    cfg = ToyConfig(200, 20, tuple(1 / v for v in inv), steps=800, batch=256, lr=2e-2, seed=0)
    models = train_toy_models(cfg)
    d_star = [interference(models.directions(i)).d_star for i in range(len(inv))]
    assert d_star[0] == pytest.approx(1.0, abs=0.05)
    for v, d in zip(inv[1:4], d_star[1:4]):
        assert d == pytest.approx(0.5, abs=0.05), (v, d_star)
    assert d_star[4] < 0.4  # past the plateau: the plateau is a plateau, not the floor
    # The norms confirm the picture: ~2m = 40 features represented on the plateau.
    n_rep = int((models.directions(2).norm(dim=1) > 0.5).sum())
    assert 36 <= n_rep <= 44
    res = check_sticky(models)
    assert res["pass"] and len(res["plateau"]) == 3


def test_best_seed_is_kept():
    cfg = ToyConfig(5, 2, (0.05, 1.0), steps=200, seeds=3, seed=1)
    models = train_toy_models(cfg)
    assert models.W.shape == (2, 2, 5) and models.b.shape == (2, 5)
    assert models.seed_losses.shape == (2, 3)
    assert torch.equal(models.loss, models.seed_losses.min(1).values)
    assert torch.equal(models.chosen, models.seed_losses.argmin(1))


def test_training_is_seeded():
    cfg = ToyConfig(5, 2, (0.1,), steps=50, seeds=2, seed=3)
    a, b = train_toy_models(cfg), train_toy_models(cfg)
    assert torch.equal(a.W, b.W) and torch.equal(a.loss, b.loss)


def test_sampling_density_and_range():
    g = torch.Generator().manual_seed(0)
    x = sample_features(20_000, torch.tensor([0.05, 0.5]), 10, g)  # [B, I, n]
    assert x.shape == (20_000, 2, 10)
    assert float(x.min()) >= 0 and float(x.max()) < 1
    dens = (x > 0).double().mean((0, 2))
    assert dens[0] == pytest.approx(0.05, rel=0.05) and dens[1] == pytest.approx(0.5, rel=0.02)
    nz = x[:, 1][x[:, 1] > 0]
    assert float(nz.mean()) == pytest.approx(0.5, abs=0.01)  # uniform in [0, 1] when nonzero


def test_forward_shapes_and_linear_mode():
    W = torch.randn(3, 2, 5)
    b = torch.randn(3, 5)
    x = torch.rand(4, 3, 5)
    out = forward(W, b, x, relu=False)
    assert out.shape == (4, 3, 5)
    expect = torch.stack([x[:, i] @ W[i].T @ W[i] + b[i] for i in range(3)], 1)
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(forward(W, b, x), torch.relu(expect))


def test_adjacent_angles():
    t = torch.arange(5) * 2 * math.pi / 5 + 0.3
    W = torch.stack([t.cos(), t.sin()], 1)
    torch.testing.assert_close(adjacent_angles(W), torch.full((5,), 72.0, dtype=torch.float64), atol=1e-4, rtol=0)
    assert float(adjacent_angles(torch.randn(7, 2)).sum()) == pytest.approx(360.0)
    with pytest.raises(ValueError, match="directions must be"):
        adjacent_angles(torch.randn(5, 3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"densities": ()}, "densities"),
        ({"densities": (0.0,)}, "densities"),
        ({"n_features": 0}, "n_features"),
        ({"seeds": 0}, "seeds"),
        ({"final_lr_fraction": 0.0}, "final_lr_fraction"),
        ({"importance_decay": -1.0}, "importance_decay"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToyConfig(**kwargs)
