"""The reference libraries' formulas, checked without the libraries (tests/interop checks
them against SAELens and sparsify themselves)."""

from __future__ import annotations

import json

import pytest
import torch

from supanalysis.dictionary import Dictionary, GroupMax, TopK, check_dictionary_site, load_dictionary, save_saelens
from supanalysis.models import TinyConfig, TinyTransformer

D, N = 8, 24


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in ((D, N), (N,), (N, D), (D,))]


def test_jumprelu_is_relu_times_step():
    threshold = torch.full((N,), -0.5)
    d = Dictionary.from_tensors(*_tensors(), threshold=threshold)
    x = torch.randn(50, D)
    pre = (x - d.b_dec) @ d.W_enc + d.b_enc
    assert torch.equal(d.encode(x), torch.relu(pre) * (pre > threshold))


def test_groupmax_keeps_one_latent_per_group():
    d = Dictionary.from_tensors(*_tensors(), GroupMax(4))
    codes = d.encode(torch.randn(30, D))
    pre = d.pre_activations(torch.randn(30, D))
    assert ((d.encode(torch.randn(30, D)) > 0).unflatten(-1, (4, -1)).sum(-1) <= 1).all()
    assert torch.equal(
        d.activation.dense(pre).unflatten(-1, (4, -1)).amax(-1), torch.relu(pre).unflatten(-1, (4, -1)).amax(-1)
    )
    assert codes.shape == (30, N)


def test_rescale_acts_by_decoder_norm_formula():
    W_enc, b_enc, W_dec, b_dec = _tensors()
    d = Dictionary.from_tensors(W_enc, b_enc, W_dec * 3, b_dec, TopK(4), rescale_acts_by_decoder_norm=True)
    x = torch.randn(20, D)
    norm = (W_dec * 3).norm(dim=-1)
    pre = ((x - b_dec) @ W_enc + b_enc) * norm
    assert torch.equal(d.encode(x), TopK(4).dense(pre))
    assert torch.allclose(d.W_dec.norm(dim=-1), torch.ones(N))
    assert torch.allclose(d.decode(d.encode(x)), d.encode(x) @ d.W_dec + b_dec, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_any_float_input_on_any_float_dictionary(dtype):
    d = Dictionary.from_tensors(*[t.to(dtype) for t in _tensors()], TopK(3))
    x = torch.randn(10, D)
    for x_dtype in (torch.float32, torch.float16, torch.bfloat16):
        codes = d.encode(x.to(x_dtype))
        assert codes.dtype == dtype and torch.equal(codes, d.encode(x.to(x_dtype).to(dtype)))


def test_center_writing_weights_recorded_and_applied(tmp_path):
    d = Dictionary.from_tensors(*_tensors(), TopK(3), metadata={"hook_name": "blocks.0.hook_resid_post"})
    save_saelens(d, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["metadata"]["model_from_pretrained_kwargs"] = {"center_writing_weights": True, "fold_ln": True}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_dictionary(tmp_path)
    assert loaded.capture_convention.center
    x = torch.randn(5, D)
    assert torch.allclose(loaded.encode(x), d.encode(x - x.mean(-1, keepdim=True)))
    cfg["metadata"]["model_from_pretrained_kwargs"] = {"fold_value_biases": True}
    cfg["metadata"]["hook_name"] = "blocks.0.attn.hook_z"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="fold_value_biases"):
        load_dictionary(tmp_path)


def test_site_mismatch_refused():
    model = TinyTransformer(TinyConfig(n_layers=2, d_model=D, n_heads=2, d_ff=16, n_ctx=8))
    d = Dictionary.from_tensors(*_tensors(), metadata={"hook_name": "blocks.0.hook_mlp_out"})
    check_dictionary_site(d, "mlp_out.0", model)
    with pytest.raises(ValueError, match=r"trained at hook_name='blocks\.0\.hook_mlp_out'"):
        check_dictionary_site(d, "resid_post.0", model)
