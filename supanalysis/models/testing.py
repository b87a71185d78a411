"""Tiny random Hugging Face causal LMs for tests and examples (built locally, never downloaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Families the tests run every check on.
HF_FAMILIES = ("gpt2", "gpt_neox", "llama")
#: Every family :func:`save_tiny_hf` can build (Qwen2: Llama's layout with q/k/v biases).
ALL_HF_FAMILIES = (*HF_FAMILIES, "qwen2")


@dataclass(frozen=True)
class TinyHFShape:
    """Shape of the models :func:`save_tiny_hf` builds.

    Attributes:
        n_layers: blocks.
        d_model: residual width.
        n_heads: query heads (Llama gets one key/value head, to exercise GQA).
        d_ff: MLP hidden width.
        vocab_size: token vocabulary.
        n_ctx: maximum positions.
    """

    n_layers: int = 3
    d_model: int = 16
    n_heads: int = 2
    d_ff: int = 40
    vocab_size: int = 61
    n_ctx: int = 32


def hf_config(family: str, shape: TinyHFShape = TinyHFShape()):
    """A ``transformers`` config of ``family`` with ``shape``."""
    import transformers as T

    common = {"vocab_size": shape.vocab_size, "bos_token_id": 0, "eos_token_id": 0}
    if family == "gpt2":
        return T.GPT2Config(n_layer=shape.n_layers, n_embd=shape.d_model, n_head=shape.n_heads,
                            n_inner=shape.d_ff, n_positions=shape.n_ctx, **common)  # fmt: skip
    kw = dict(num_hidden_layers=shape.n_layers, hidden_size=shape.d_model,
              num_attention_heads=shape.n_heads, intermediate_size=shape.d_ff,
              max_position_embeddings=shape.n_ctx, **common)  # fmt: skip
    if family == "gpt_neox":
        return T.GPTNeoXConfig(**kw)
    if family == "llama":
        return T.LlamaConfig(num_key_value_heads=1, **kw)
    if family == "qwen2":
        return T.Qwen2Config(num_key_value_heads=1, **kw)
    raise ValueError(f"family={family!r} unknown; one of {ALL_HF_FAMILIES}")


def save_tiny_hf(family: str, folder: str | Path, shape: TinyHFShape = TinyHFShape(), seed: int = 0) -> Path:
    """Build a randomly initialised ``family`` model and ``save_pretrained`` it to ``folder``."""
    import torch
    import transformers as T

    T.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(hf_config(family, shape))
    model.save_pretrained(folder)
    return Path(folder)
