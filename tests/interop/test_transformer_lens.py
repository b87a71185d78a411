"""Every TransformerLens hook point the capture offers equals TransformerLens' own value."""

from __future__ import annotations

import pytest
import torch
from interop_reference import max_diff, tiny_hf, tl_model

from supanalysis.capture import capture
from supanalysis.models.testing import ALL_HF_FAMILIES, TinyHFShape

pytest.importorskip("transformer_lens")
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = TinyHFShape()
BLOCK_HOOKS = (
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_pattern",
    "mlp.hook_pre", "mlp.hook_post", "ln1.hook_scale", "ln1.hook_normalized",
    "ln2.hook_scale", "ln2.hook_normalized",
)  # fmt: skip
#: float32 rounding of a 3-block tiny model: values are O(1), TransformerLens reorders sums.
TOL = 2e-5


@pytest.fixture(scope="module", params=ALL_HF_FAMILIES)
def models(request, tmp_path_factory):
    hf, folder = tiny_hf(request.param, tmp_path_factory.mktemp("model"))
    return request.param, hf, tl_model(hf, folder)


def _names(family: str, tl) -> list[str]:
    names = [f"blocks.{l}.{h}" for l in range(SHAPE.n_layers) for h in BLOCK_HOOKS]
    names += ["hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized"]
    if family == "gpt2":
        names.append("hook_pos_embed")
    if family in ("llama", "qwen2"):
        names += [f"blocks.{l}.mlp.hook_pre_linear" for l in range(SHAPE.n_layers)]
    return [n for n in names if n in tl.hook_dict]


def test_every_hook_matches_transformer_lens(models):
    family, hf, tl = models
    ids = torch.randint(0, SHAPE.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    names = _names(family, tl)
    with torch.no_grad():
        _, ref = tl.run_with_cache(ids)
        with capture(hf, names) as cache:
            hf(ids)
    diffs = {n: max_diff(cache[n].expand_as(ref[n]), ref[n]) for n in names}
    worst = max(diffs, key=diffs.get)
    print(f"{family}: {len(names)} hooks, max |diff| {diffs[worst]:.2e} at {worst}")
    assert diffs[worst] < TOL, {n: d for n, d in diffs.items() if d >= TOL}
    # ln_final.hook_normalized is before the norm's weight and bias; ln_final is after them.
    with capture(hf, ["ln_final", "ln_final.hook_normalized"]) as cache, torch.no_grad():
        hf(ids)
    assert max_diff(cache["ln_final"], cache["ln_final.hook_normalized"]) > 1e-3


def test_resid_mid_refused_for_parallel_blocks(models):
    family, hf, tl = models
    if family != "gpt_neox":
        pytest.skip("only GPT-NeoX runs attention and MLP in parallel")
    assert "blocks.0.hook_resid_mid" not in tl.hook_dict
    with pytest.raises(ValueError, match="parallel"), capture(hf, ["blocks.0.hook_resid_mid"]):
        pass
