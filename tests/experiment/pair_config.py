"""The two-model test config the experiment tests share: folders A and B and tokens.npy under one root."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from supanalysis.config import ModelSpec, TestConfig
from supanalysis.models import TinyConfig, TinyTransformer


def tiny(L: int, d: int, seed: int) -> TinyTransformer:
    """A seeded TinyTransformer of L layers, width d, over the 64-token vocabulary of these tests."""
    torch.manual_seed(seed)
    return TinyTransformer(TinyConfig(n_layers=L, d_model=d, n_heads=2, d_ff=4 * d, vocab_size=64, n_ctx=32)).eval()


def pair_config(root, *, stats_tokens: int, bootstrap: int, **kw) -> TestConfig:
    """A small run over ``root/A``, ``root/B`` and ``root/tokens.npy``; ``kw`` overrides any field."""
    base = dict(
        model_a=ModelSpec(path=str(root / "A"), name="A"),
        model_b=ModelSpec(path=str(root / "B"), name="B"),
        tokens=str(root / "tokens.npy"),
        seq_len=32,
        batch_size=8,
        eval_tokens=1000,
        stats_tokens=stats_tokens,
        match_tokens=2000,
        bootstrap=bootstrap,
    )
    base.update(kw)
    return TestConfig(**base)


def pair_workspace(root: Path, n_tokens: int) -> Path:
    """``root`` with random tokens.npy (64-token vocabulary), A = 1 layer x 16 and B = 2 layers x 8."""
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, 64, size=n_tokens).astype(np.uint16))
    tiny(1, 16, 0).save(root / "A")
    tiny(2, 8, 1).save(root / "B")
    return root
