"""TopK SAE recipe: sparse step = dense reference, robust b_dec, schedule, resampling, determinism."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from supanalysis.dictionary import TopKTrainConfig, train_topk_sae
from supanalysis.dictionary.topk_kernels import dense_topk_sae_loss, topk_sae_loss
from supanalysis.dictionary.train_recipe import geometric_median, lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _params(m: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = ((m, n), (n,), (n, m), (m,))
    return [(torch.randn(*s, generator=g, dtype=torch.float64) * 0.3).requires_grad_() for s in shapes]


@pytest.mark.parametrize("n", [256, 64])  # k * 32 <= n: scatter backward; else dense codes
@pytest.mark.parametrize("dead_fraction", [None, 0.0, 0.3])
def test_sparse_step_matches_dense_reference(dead_fraction, n):
    m, k = 16, 4
    x = torch.randn(300, m, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dead = None if dead_fraction is None else torch.rand(n, generator=torch.Generator().manual_seed(2)) < dead_fraction
    a, b = _params(m, n), _params(m, n)
    loss, _main, aux, idx, act = topk_sae_loss(x, *a, k, dead, 8, 1 / 32)
    loss.backward()
    ref, _ref_main, ref_aux = dense_topk_sae_loss(x, *b, k, dead, 8, 1 / 32)
    ref.backward()
    assert idx.shape == act.shape == (300, k)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux, ref_aux.detach(), rtol=1e-12, atol=1e-12)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_geometric_median_resists_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=g) + 3.0
    x[:5] = 1e4  # a few huge activations, as in a residual stream's massive dimensions
    centre = geometric_median(x, 20)
    assert (centre - 3.0).abs().max() < 0.2
    assert (x.mean(0) - 3.0).abs().min() > 10


def test_learning_rate_warms_up_then_decays_to_zero():
    f = [lr_factor(t, 1000, 100, "linear", 0.8) for t in range(0, 1000, 10)]
    assert f[0] < 0.02 and f[9] < f[10] == 1.0
    assert f[50] == 1.0 and f[90] == pytest.approx(0.5, abs=0.01) and f[-1] < 0.1
    assert lr_factor(900, 1000, 0, "cosine", 0.8) == pytest.approx(0.5)
    assert lr_factor(999, 1000, 0, "none", 0.8) == 1.0


def _sparse_data(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(48, 16, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    return [((torch.rand(256, 48, generator=g) < 0.06) * torch.rand(256, 48, generator=g)) @ dirs + 0.3
            for _ in range(8)]  # fmt: skip


def test_resampling_repoints_dead_latents_and_keeps_training_sane():
    data = _sparse_data()
    base = dict(batch_size=128, log_every=4, dead_after_tokens=256, decay_start=0.9)
    kept = train_topk_sae(data, None, 256, 2, 8 * 256 * 2, config=TopKTrainConfig(**base, resample_after_tokens=0),
                          progress=False)  # fmt: skip
    revived = train_topk_sae(data, None, 256, 2, 8 * 256 * 2, config=TopKTrainConfig(**base, resample_after_tokens=512),
                             progress=False)  # fmt: skip
    assert kept.history[-1]["resampled"] == 0 < revived.history[-1]["resampled"]
    # Resampled latents start over (counters cleared), so fewer count dead right after a check.
    assert revived.history[4]["dead_fraction"] < kept.history[4]["dead_fraction"]
    assert revived.fvu < 1 and torch.allclose(revived.dictionary.W_dec.norm(dim=1), torch.ones(256), atol=1e-5)


def test_training_is_deterministic_for_a_seed():
    data = _sparse_data()
    cfg = TopKTrainConfig(batch_size=128, dead_after_tokens=256, resample_after_tokens=512)
    one, two = (train_topk_sae(data, None, 128, 4, 8 * 256, config=cfg, progress=False) for _ in range(2))
    other = train_topk_sae(data, None, 128, 4, 8 * 256, config=replace(cfg, seed=1), progress=False)
    assert torch.equal(one.dictionary.W_dec, two.dictionary.W_dec) and one.history == two.history
    assert not torch.equal(one.dictionary.W_dec, other.dictionary.W_dec)
