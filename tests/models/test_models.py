"""TinyTransformer, models.load, describe (exact parameter counts)."""

from __future__ import annotations

import json

import pytest
import torch

from supanalysis.models import ArchSpec, ModelShape, TinyConfig, TinyTransformer, describe, load
from supanalysis.models.testing import HF_FAMILIES, TinyHFShape, save_tiny_hf

SHAPE = TinyHFShape()


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _tiny(**kw) -> TinyTransformer:
    torch.manual_seed(0)
    cfg = dict(n_layers=2, d_model=16, n_heads=2, d_ff=40, vocab_size=50, n_ctx=8)
    return TinyTransformer(TinyConfig(**{**cfg, **kw})).eval()


def test_tiny_forward_shape_and_causality():
    model = _tiny()
    ids = torch.randint(0, 50, (3, 8))
    logits = model(ids)
    assert logits.shape == (3, 8, 50)
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % 50  # changing the last token must not change the past
    assert torch.equal(model(ids2)[:, :-1], logits[:, :-1])


def test_tiny_rejects_bad_config():
    with pytest.raises(ValueError, match="n_heads"):
        TinyConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="n_layers"):
        TinyConfig(n_layers=0)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_save_load_roundtrip(tmp_path, tied):
    model = _tiny(tie_embeddings=tied)
    model.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "supanalysis-tiny" and cfg["tie_embeddings"] is tied
    for loaded in (TinyTransformer.load(tmp_path), load(tmp_path)):
        assert not loaded.training
        for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2)
        assert (loaded.unembed.weight is loaded.embed.weight) is tied
        ids = torch.randint(0, 50, (2, 8))
        assert torch.equal(loaded(ids), model(ids))


def _hand_count_tiny(L, d, dff, V, n_ctx, tied):
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * dff + dff) + (dff * d + d)
    non_emb = L * block + 2 * d  # + final LayerNorm
    total = non_emb + V * d + n_ctx * d + (0 if tied else V * d)
    return non_emb, total


@pytest.mark.parametrize("tied", [False, True])
def test_describe_tiny_hand_count(tied):
    model = _tiny(tie_embeddings=tied)
    shape = describe(model)
    non_emb, total = _hand_count_tiny(2, 16, 40, 50, 8, tied)
    assert isinstance(shape, ModelShape)
    assert (shape.n_layers, shape.d_model, shape.d_ff, shape.n_heads, shape.vocab_size) == (
        2, 16, 40, 2, 50,
    )  # fmt: skip
    assert shape.non_embedding_params == non_emb
    assert shape.total_params == total
    assert shape.kaplan_params == 12 * 2 * 16**2
    assert shape.aspect_ratio == 8.0
    assert shape.neurons_per_site["mlp_post"] == 40 and shape.neurons_per_site["resid_post"] == 16
    assert shape.total_neurons("mlp_post") == 80


def _hand_count_hf(family: str, tied: bool) -> tuple[int, int]:
    """(non-embedding, embedding) parameters of the tiny models in _hf_models, by formula."""
    L, d, dff, V = SHAPE.n_layers, SHAPE.d_model, SHAPE.d_ff, SHAPE.vocab_size
    if family == "gpt2":
        block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * dff + dff) + (dff * d + d)
        return L * block + 2 * d, V * d + SHAPE.n_ctx * d + (0 if tied else V * d)
    if family == "gpt_neox":
        block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * dff + dff) + (dff * d + d)
        return L * block + 2 * d, V * d + (0 if tied else V * d)
    kv = d // SHAPE.n_heads  # one key/value head
    block = 2 * d + d * d + 2 * d * kv + d * d + 3 * d * dff
    return L * block + d, V * d + (0 if tied else V * d)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hf_load_and_describe_hand_count(tmp_path, family):
    pytest.importorskip("transformers")
    save_tiny_hf(family, tmp_path)
    model = load(tmp_path)
    assert not model.training
    shape = describe(model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    non_emb, emb = _hand_count_hf(family, tied)
    assert shape.architecture == family
    assert (shape.n_layers, shape.d_model, shape.d_ff, shape.n_heads, shape.vocab_size) == (
        SHAPE.n_layers, SHAPE.d_model, SHAPE.d_ff, SHAPE.n_heads, SHAPE.vocab_size,
    )  # fmt: skip
    assert shape.non_embedding_params == non_emb
    # parameters() yields a tied weight once, like the hand count
    assert shape.total_params == non_emb + emb == sum(p.numel() for p in model.parameters())


def test_load_refuses_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load(tmp_path)


def test_load_passes_modules_through():
    model = _tiny().train()
    assert load(model) is model and not model.training


def test_describe_unknown_model_names_missing_fields():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"n_layers.*d_model") as err:
        describe(model)
    assert "describe(model," in str(err.value)


def test_describe_with_explicit_arch():
    # A TinyTransformer wrapped in another module: point an ArchSpec at the inner paths.
    wrapper = torch.nn.Module()
    wrapper.net = _tiny()
    spec = ArchSpec("wrapped", "net.blocks", "attn", "mlp", "mlp.fc_out", "net.ln_f",
                    "net.embed", "net.unembed", "net.pos_embed")  # fmt: skip
    shape = describe(wrapper, arch=spec, n_heads=2)
    assert shape.non_embedding_params == describe(wrapper.net).non_embedding_params
