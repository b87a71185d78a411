"""TopK SAE training: unit-norm decoder, metrics, exact resume, FVU on TinyTransformer."""

from __future__ import annotations

import pytest
import torch

from supanalysis.capture import ActivationSource
from supanalysis.data import TokenSequences, stdlib_corpus
from supanalysis.dictionary import (
    TopK,
    TopKTrainConfig,
    evaluate_sae,
    fvu,
    load_saelens,
    train_topk_sae,
)
from supanalysis.models import TinyConfig, TinyTransformer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _synthetic(n_batches=12, t=512, m=16, n=64, seed=0) -> list[torch.Tensor]:
    """Sparse sums of n random unit directions in R^m."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n, m, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    out = []
    for _ in range(n_batches):
        codes = (torch.rand(t, n, generator=g) < 0.05) * torch.rand(t, n, generator=g)
        out.append(codes @ directions + 0.5)
    return out


def test_fvu_definition():
    x = torch.randn(100, 4, dtype=torch.float64)
    assert fvu(x, x) == 0
    assert torch.allclose(fvu(x, x.mean(0).expand_as(x)), torch.tensor(1.0, dtype=torch.float64))


def test_training_metrics_and_unit_decoder():
    data = _synthetic()
    cfg = TopKTrainConfig(batch_size=512, log_every=4, dead_after_tokens=1024)
    result = train_topk_sae(data, None, 64, 4, 12 * 512 * 2, config=cfg, progress=False)
    sae = result.dictionary
    assert isinstance(sae.activation, TopK) and sae.k == 4
    assert result.tokens == 12 * 512 * 2 and result.steps == 24  # the list was cycled
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    assert result.l0 <= 4 and 0 <= result.dead_fraction <= 1
    assert result.history[0]["fvu"] > result.fvu  # it learns
    assert [h["step"] for h in result.history] == [4, 8, 12, 16, 20, 24]


def test_dead_latents_are_tracked_and_revived_by_auxk():
    data = _synthetic(n_batches=6)
    cfg = TopKTrainConfig(batch_size=512, dead_after_tokens=512, log_every=1)
    result = train_topk_sae(data, None, 256, 2, 6 * 512 * 4, config=cfg, progress=False)
    # With 256 latents, k=2 and 64 true directions many latents die; AuxK is then active.
    assert any(h["dead_fraction"] > 0 for h in result.history)
    assert any(h["aux_loss"] > 0 for h in result.history)


def test_resume_from_checkpoint_is_exact(tmp_path):
    data = _synthetic(n_batches=8)
    # The first leg asks for fewer tokens than the whole run; a schedule tied to n_tokens would
    # differ between the two, so the learning rate is held constant here.
    cfg = TopKTrainConfig(batch_size=512, log_every=2, dead_after_tokens=1024, warmup_tokens=0, lr_decay="none")
    straight = train_topk_sae(data, None, 32, 4, 8 * 512, config=cfg, progress=False)
    first = train_topk_sae(data, None, 32, 4, 4 * 512, config=cfg, checkpoint_dir=tmp_path,
                           progress=False)  # fmt: skip
    assert first.tokens == 4 * 512 and load_saelens(tmp_path).k == 4
    resumed = train_topk_sae(data, None, 32, 4, 8 * 512, config=cfg, checkpoint_dir=tmp_path,
                             progress=False)  # fmt: skip
    assert resumed.tokens == straight.tokens and resumed.steps == straight.steps
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(resumed.dictionary, name), getattr(straight.dictionary, name))
    assert resumed.history == straight.history


def test_topk_sae_on_tiny_transformer_reaches_low_fvu():
    """d_sae = 8·d_model, k = 16 on a TinyTransformer's residual stream (random weights
    here to stay fast; a trained model's number is in bench/RESULTS.md)."""
    torch.manual_seed(0)
    d_model = 32
    model = TinyTransformer(TinyConfig(n_layers=2, d_model=d_model, n_heads=4, d_ff=128,
                                       n_ctx=32)).eval()  # fmt: skip
    tokens = TokenSequences(stdlib_corpus(max_bytes=400_000), seq_len=32, batch_size=32)
    source = ActivationSource(model, tokens, ["resid_post.1"], progress=False)
    # A higher lr than Gao's default (tuned for far larger SAEs) keeps the test short.
    cfg = TopKTrainConfig(batch_size=512, lr=4e-3, log_every=20)
    result = train_topk_sae(source, "resid_post.1", 8 * d_model, 16, 120_000, config=cfg,
                            progress=False)  # fmt: skip
    assert result.dictionary.metadata["hook_name"] == "resid_post.1"
    assert result.fvu < 0.1, result.history
    assert result.dead_fraction < 0.5


def test_evaluate_sae_matches_one_shot_fvu():
    data = _synthetic(n_batches=3)
    result = train_topk_sae(data, None, 64, 4, 3 * 512, config=TopKTrainConfig(batch_size=512),
                            progress=False)  # fmt: skip
    sae = result.dictionary
    metrics = evaluate_sae(sae, data, None)
    x = torch.cat(data).double()
    with torch.no_grad():
        x_hat = sae(torch.cat(data)).double()
    assert metrics["tokens"] == 3 * 512
    assert abs(metrics["fvu"] - fvu(x, x_hat).item()) < 1e-6
    assert metrics["l0"] <= 4


def test_training_keeps_no_tensor_alive_after_it_returns():
    # The decoder-gradient projection once ran under autograd: each step's gradient then held
    # a graph holding the last one, two tensors per step, GBs over a long run.
    import gc

    from supanalysis.dictionary.train import TopKTrainConfig, train_topk_sae

    def live() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    train_topk_sae([x], None, 64, 4, 4096, config=TopKTrainConfig(batch_size=128), progress=False)  # warm up
    before = live()
    result = train_topk_sae([x], None, 64, 4, 4096, config=TopKTrainConfig(batch_size=128), progress=False)
    del result
    assert live() - before <= 2, "a training run left tensors alive"
