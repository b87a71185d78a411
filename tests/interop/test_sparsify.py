"""sparsify folders give sparsify's own codes: groupmax, transcoders, bfloat16 top-k, hookpoints."""

from __future__ import annotations

import pytest
import torch
from interop_reference import max_diff, tiny_hf

from supanalysis.dictionary import check_dictionary_site, load_sparsify

sparsify = pytest.importorskip("sparsify")
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
D_IN, N, K = 16, 64, 8


def _coder(dtype=torch.float32, **cfg) -> SparseCoder:
    coder = SparseCoder(D_IN, SparseCoderConfig(num_latents=N, k=K, **cfg), dtype=dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return coder


def _dense(top_acts: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*top_acts.shape[:-1], N, dtype=top_acts.dtype).scatter_(-1, top_indices, top_acts)


def _roundtrip(coder: SparseCoder, folder):
    coder.save_to_disk(folder)
    return SparseCoder.load_from_disk(folder), load_sparsify(folder)


def _x(n: int = 400, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("cfg", [{"activation": "groupmax"}, {"transcode": True}, {}])
def test_codes_match_sparsify(tmp_path, cfg):
    ref, ours = _roundtrip(_coder(**cfg), tmp_path / "layers.1")
    x = _x()
    with torch.no_grad():
        out = ref.encode(x)
        diff = max_diff(ours.encode(x), _dense(out.top_acts, out.top_indices))
        indices, values = ours.encode(x, sparse=True)
        assert max_diff(ours.decode_sparse(indices, values), ref.decode(out.top_acts, out.top_indices)) < 1e-5
    print(f"{cfg}: max |code diff| {diff:.2e}")
    assert diff < 1e-6
    assert ours.transcoder == bool(cfg.get("transcode"))


def test_bfloat16_topk_chooses_sparsify_latents(tmp_path):
    ref, ours = _roundtrip(_coder(torch.bfloat16), tmp_path / "layers.1")
    x = _x(2000, torch.bfloat16)
    with torch.no_grad():
        out = ref.encode(x)
        indices, values = ours.encode(x, sparse=True)
    differ = (indices.sort(-1).values != out.top_indices.sort(-1).values).any(-1).sum().item()
    print(f"bf16: {differ} of {x.shape[0]} rows choose other latents")
    assert differ == 0
    assert torch.equal(_dense(values, indices), _dense(out.top_acts, out.top_indices))
    # float32 input on a bfloat16 dictionary is cast first, as in SAELens.
    assert torch.equal(ours.encode(x.float()), ours.encode(x))


def test_hookpoint_checked_against_the_site(tmp_path):
    hf, _ = tiny_hf("gpt2", tmp_path / "model")
    _, ours = _roundtrip(_coder(), tmp_path / "h.1")
    assert ours.metadata["hookpoint"] == "h.1"
    check_dictionary_site(ours, "resid_post.1", hf)
    with pytest.raises(ValueError, match=r"hookpoint='h.1'"):
        check_dictionary_site(ours, "resid_post.0", hf)
