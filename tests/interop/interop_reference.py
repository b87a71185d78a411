"""Reference models and SAEs for the interop tests, built locally (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from supanalysis.models import load
from supanalysis.models.testing import save_tiny_hf

#: TransformerLens processing flags, all off: ``from_pretrained_no_processing``.
NO_PROCESSING = {
    "fold_ln": False,
    "center_writing_weights": False,
    "center_unembed": False,
    "fold_value_biases": False,
    "refactor_factored_attn_matrices": False,
}


def tiny_hf(family: str, folder: Path) -> tuple[torch.nn.Module, Path]:
    """A tiny random ``family`` model saved to ``folder`` and loaded back, its norms' weights
    and biases randomised (freshly initialised they are 1 and 0, which would hide a hook read
    on the wrong side of them). ``folder``'s name must not contain the family name:
    TransformerLens guesses some architectures from the name."""
    save_tiny_hf(family, folder)
    model = load(folder)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=g))
    model.save_pretrained(folder)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if family == "gpt2":  # TransformerLens' GPT-2 converter reads n_ctx, which transformers 5 drops
        cfg["n_ctx"] = cfg["n_positions"]
        cfg_path.write_text(json.dumps(cfg))
    return load(folder), folder


def tl_model(hf: torch.nn.Module, folder: Path, **processing: bool):
    """The TransformerLens HookedTransformer of ``hf`` (weights converted by TransformerLens
    itself), processed with ``processing`` on top of no processing."""
    loading = pytest.importorskip("transformer_lens.loading_from_pretrained")
    from transformer_lens import HookedTransformer

    flags = {**NO_PROCESSING, **processing}
    cfg = loading.get_pretrained_model_config(str(folder), device="cpu", fold_ln=flags["fold_ln"])
    cfg.tokenizer_name = None
    if getattr(hf.config, "n_inner", None):  # its GPT-2 converter assumes d_mlp = 4 d_model
        cfg.d_mlp = hf.config.n_inner
    state = loading.get_pretrained_state_dict(str(folder), cfg, hf_model=hf)
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    model.load_and_process_state_dict(state, **flags)
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()
