"""Where the parts of a transformer live, per architecture (one registry).

An :class:`ArchSpec` names module paths relative to the model root, so that sites
(``resid_post.3``) and shape descriptions work the same way for every supported family.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .tiny import TinyTransformer


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture family.

    Attributes:
        name: family name (``"gpt2"``, ``"gpt_neox"``, ``"llama"``, ``"tiny"``).
        blocks: path of the ``ModuleList`` of transformer blocks.
        attn: attention module, relative to a block; its output is ``attn_out``.
        mlp: MLP module, relative to a block; its output is ``mlp_out``.
        mlp_down: the MLP's output projection, relative to a block; its *input* is
            ``mlp_post`` (after the nonlinearity, and after the gate product in gated
            MLPs, width d_ff).
        final_norm: final normalisation before the unembedding.
        token_embed: token embedding.
        unembed: unembedding (``lm_head``); may share its weight with ``token_embed``.
        pos_embed: learned position embedding, ``None`` for rotary models.
        ln1, ln2: the norms before attention and before the MLP, relative to a block.
        qkv: the query, key and value projections, relative to a block (one path three
            times when they are fused).
        qkv_layout: how a fused projection's output is laid out: ``"separate"`` (three
            modules), ``"split"`` (q | k | v, GPT-2), ``"interleaved"`` (per head q | k | v,
            GPT-NeoX).
        attn_o: the attention output projection; its input is the per-head ``hook_z``.
        mlp_in: the MLP's input projection whose output is TransformerLens' ``mlp.hook_pre``
            (the gate projection in gated MLPs).
        mlp_in_linear: the ungated input projection of a gated MLP (``mlp.hook_pre_linear``).
    """

    name: str
    blocks: str
    attn: str
    mlp: str
    mlp_down: str
    final_norm: str
    token_embed: str
    unembed: str
    pos_embed: str | None = None
    ln1: str | None = None
    ln2: str | None = None
    qkv: tuple[str, str, str] | None = None
    qkv_layout: str = "separate"
    attn_o: str | None = None
    mlp_in: str | None = None
    mlp_in_linear: str | None = None


TINY = ArchSpec(
    "tiny", "blocks", "attn", "mlp", "mlp.fc_out", "ln_f", "embed", "unembed", "pos_embed",
    ln1="ln1", ln2="ln2", qkv=("attn.qkv",) * 3, qkv_layout="split", attn_o="attn.out", mlp_in="mlp.fc_in",
)  # fmt: skip
GPT2 = ArchSpec(
    "gpt2", "transformer.h", "attn", "mlp", "mlp.c_proj", "transformer.ln_f",
    "transformer.wte", "lm_head", "transformer.wpe",
    ln1="ln_1", ln2="ln_2", qkv=("attn.c_attn",) * 3, qkv_layout="split", attn_o="attn.c_proj", mlp_in="mlp.c_fc",
)  # fmt: skip
GPT_NEOX = ArchSpec(
    "gpt_neox", "gpt_neox.layers", "attention", "mlp", "mlp.dense_4h_to_h",
    "gpt_neox.final_layer_norm", "gpt_neox.embed_in", "lm_head",
    ln1="input_layernorm", ln2="post_attention_layernorm", qkv=("attention.query_key_value",) * 3,
    qkv_layout="interleaved", attn_o="attention.dense", mlp_in="mlp.dense_h_to_4h",
)  # fmt: skip
LLAMA = ArchSpec(
    "llama", "model.layers", "self_attn", "mlp", "mlp.down_proj", "model.norm",
    "model.embed_tokens", "lm_head",
    ln1="input_layernorm", ln2="post_attention_layernorm",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attn_o="self_attn.o_proj",
    mlp_in="mlp.gate_proj", mlp_in_linear="mlp.up_proj",
)  # fmt: skip

#: Hugging Face ``config.model_type`` -> spec. Mistral and Qwen2 share Llama's layout.
ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "tiny": TINY,
}


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Teach sites and :func:`describe` a new family, keyed by ``config.model_type``."""
    ARCHITECTURES[model_type] = spec


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path``; the error names the first missing part."""
    if not path:
        return model
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise ValueError(f"{type(model).__name__} has no submodule {path!r} ({err})") from None


def _resolve_unembed(model: nn.Module, spec: ArchSpec) -> ArchSpec:
    # GPT-NeoX calls its unembedding lm_head (transformers 5) or embed_out (4.x).
    if spec.name == "gpt_neox" and not hasattr(model, spec.unembed) and hasattr(model, "embed_out"):
        return ArchSpec(**{**spec.__dict__, "unembed": "embed_out"})
    return spec


def arch_of(model: nn.Module, arch: ArchSpec | str | None = None) -> ArchSpec:
    """The :class:`ArchSpec` of ``model``.

    Args:
        model: a :class:`TinyTransformer` or a Hugging Face causal LM.
        arch: force a spec (or a registered ``model_type`` name) instead of detecting it.
    """
    if isinstance(arch, ArchSpec):
        return arch
    if isinstance(arch, str):
        if arch not in ARCHITECTURES:
            raise ValueError(f"arch={arch!r} is not registered; known: {sorted(ARCHITECTURES)}")
        return _resolve_unembed(model, ARCHITECTURES[arch])
    if isinstance(model, TinyTransformer):
        return TINY
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return _resolve_unembed(model, ARCHITECTURES[model_type])
    raise ValueError(
        f"cannot tell where the blocks of {type(model).__name__} (model_type={model_type!r}) "
        f"live; supported: {sorted(ARCHITECTURES)}. Pass arch=ArchSpec(...) or call "
        "supanalysis.models.register_architecture(model_type, ArchSpec(...)); module paths "
        "such as 'model.layers.3' work as sites without it."
    )
