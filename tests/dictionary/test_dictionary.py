"""Dictionaries: encode/decode, activations, NeuronBasis, SAELens and sparsify folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from supanalysis.dictionary import (
    ACTIVATIONS,
    Dictionary,
    JumpReLU,
    NeuronBasis,
    TopK,
    load_dictionary,
    load_saelens,
    load_sparsify,
    save_dictionary,
    save_saelens,
    save_sparsify,
)

D_IN, N = 12, 40


def _random(activation="relu", k=None, dtype=torch.float32, **kw) -> Dictionary:
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
         for s in ((D_IN, N), (N,), (N, D_IN), (D_IN,))]  # fmt: skip
    if activation == "jumprelu":
        kw["threshold"] = torch.rand(N, generator=g, dtype=torch.float64).to(dtype)
    if activation == "topk":
        activation = TopK(k)
    return Dictionary.from_tensors(*t, activation, **kw)


def _assert_same(a: Dictionary, b: Dictionary) -> None:
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert type(a.activation) is type(b.activation) and a.k == b.k
    if isinstance(a.activation, JumpReLU):
        assert torch.equal(a.activation.threshold, b.activation.threshold)
    assert a.apply_b_dec_to_input == b.apply_b_dec_to_input


def test_registry():
    assert {"relu", "topk", "jumprelu"} <= set(ACTIVATIONS)
    with pytest.raises(ValueError, match="registered"):
        Dictionary(4, 8, "gelu")
    with pytest.raises(ValueError, match="needs k"):
        Dictionary(4, 8, "topk")


def test_dense_encode_decode_match_formulas():
    d = _random(dtype=torch.float64)
    x = torch.randn(7, D_IN, dtype=torch.float64)
    pre = (x - d.b_dec) @ d.W_enc + d.b_enc
    codes = d.encode(x)
    assert torch.equal(codes, torch.relu(pre))
    assert torch.allclose(d.decode(codes), torch.relu(pre) @ d.W_dec + d.b_dec)
    assert d.W_dec.shape == (N, D_IN)
    assert d.encode(x.view(7, 1, D_IN)).shape == (7, 1, N)
    with pytest.raises(ValueError, match="width 5"):
        d.encode(torch.randn(2, 5, dtype=torch.float64))


def test_topk_sparse_matches_dense_and_decodes():
    d = _random("topk", k=5, dtype=torch.float64)
    x = torch.randn(9, D_IN, dtype=torch.float64)
    indices, values = d.encode(x, sparse=True)
    assert indices.shape == values.shape == (9, 5) and indices.dtype == torch.int64
    dense = d.encode(x)
    assert ((dense != 0).sum(1) <= 5).all()
    scattered = torch.zeros(9, N, dtype=torch.float64).scatter_(1, indices, values)
    assert torch.equal(scattered, dense)
    assert torch.allclose(d.decode_sparse(indices, values), d.decode(dense))


def test_jumprelu_threshold():
    d = _random("jumprelu", dtype=torch.float64)
    x = torch.randn(6, D_IN, dtype=torch.float64)
    pre = d.pre_activations(x)
    expected = torch.where(pre > d.activation.threshold, pre, torch.zeros_like(pre))
    assert torch.equal(d.encode(x), expected)
    indices, values = d.encode(x, sparse=True, k=3)
    assert torch.equal(values, expected.gather(1, indices))


def test_neuron_basis():
    basis = NeuronBasis(6)
    x = torch.randn(4, 6)
    assert basis.encode(x) is x and basis.decode(x) is x
    assert torch.equal(basis.W_dec, torch.eye(6)) and basis.n_features == 6
    indices, values = basis.encode(x, sparse=True, k=2)
    assert torch.equal(values, x.gather(1, indices))
    assert torch.equal(values.abs().sort(1).values, x.abs().topk(2, dim=1).values.sort(1).values)
    assert list(basis.parameters()) == []


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saelens_round_trip_exact(tmp_path, arch, dtype):
    d = _random(arch, k=4, dtype=dtype, metadata={"hook_name": "blocks.2.hook_resid_post"},
                apply_b_dec_to_input=arch != "relu")  # fmt: skip
    d.log10_density = torch.linspace(-5, 0, N)
    save_saelens(d, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"]) == (D_IN, N)
    assert cfg["architecture"] == {"relu": "standard"}.get(arch, arch)
    assert cfg["hook_name"] == cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert weights["W_enc"].shape == (D_IN, N) and weights["W_dec"].shape == (N, D_IN)
    for loaded in (load_saelens(tmp_path), load_dictionary(tmp_path)):
        _assert_same(d, loaded)
        assert torch.equal(loaded.log10_density, d.log10_density)
        assert loaded.metadata["hook_name"] == "blocks.2.hook_resid_post"


def test_sparsify_round_trip_exact(tmp_path):
    d = _random("topk", k=6)
    save_dictionary(d, tmp_path, "sparsify")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["k"], cfg["num_latents"]) == (D_IN, 6, N)
    weights = load_file(str(tmp_path / "sae.safetensors"))
    assert weights["encoder.weight"].shape == (N, D_IN)
    assert torch.equal(weights["encoder.weight"], d.W_enc.T)
    for loaded in (load_sparsify(tmp_path), load_dictionary(tmp_path)):
        _assert_same(d, loaded)
    x = torch.randn(3, D_IN)
    # sparsify's fused encoder bias (one addmm) rounds differently from x @ W_enc + b_enc on
    # some BLAS builds: the codes agree to float32 rounding, the chosen latents exactly.
    got, want = load_sparsify(tmp_path).encode(x, sparse=True), d.encode(x, sparse=True)
    assert torch.equal(got[0].sort(-1).values, want[0].sort(-1).values)
    torch.testing.assert_close(load_sparsify(tmp_path).encode(x), d.encode(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="TopK"):
        save_sparsify(_random("relu"), tmp_path / "relu")


def test_saelens_malformed_folders(tmp_path):
    d = _random("jumprelu")
    save_saelens(d, tmp_path)
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "threshold"},
              str(tmp_path / "sae_weights.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match="missing tensor 'threshold'"):
        load_saelens(tmp_path)
    save_file({**weights, "W_dec": weights["W_dec"].T.contiguous()},
              str(tmp_path / "sae_weights.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match=r"'W_dec' has shape \(12, 40\), expected \(40, 12\)"):
        load_saelens(tmp_path)
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"sae_weights\.safetensors"):
        load_saelens(tmp_path)
    (tmp_path / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"cfg\.json"):
        load_saelens(tmp_path)


def test_sparsify_malformed_and_undetectable(tmp_path):
    save_sparsify(_random("topk", k=3), tmp_path)
    weights = load_file(str(tmp_path / "sae.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "encoder.bias"},
              str(tmp_path / "sae.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match=r"missing tensor 'encoder\.bias'"):
        load_sparsify(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "k": "3"}))
    with pytest.raises(ValueError, match="'k' must be a positive int"):
        load_sparsify(tmp_path)
    # a pickle is never opened: a folder holding only a .pt is refused by name
    empty = tmp_path / "pickled"
    empty.mkdir()
    (empty / "sae.pt").write_bytes(b"not opened")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_dictionary(empty)
