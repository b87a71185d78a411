"""Sites: names for where activations are read, resolved to a module, a hook and a transform.

Accepted names, for a model with L blocks (``l`` in ``0..L-1``, negative counts from the end):

- aliases ``resid_pre.l`` (input of block l), ``resid_mid.l`` (after attention, before the
  MLP), ``resid_post.l`` (output of block l), ``attn_out.l``, ``mlp_out.l`` (outputs of the
  attention and MLP modules), ``mlp_pre.l`` (MLP hidden before the nonlinearity; the gate
  projection in gated MLPs), ``mlp_post.l`` (MLP hidden after the nonlinearity -- the input of
  the MLP's output projection, so it includes the gate product in gated MLPs; width d_ff),
  ``attn_q.l``/``attn_k.l``/``attn_v.l``/``attn_z.l`` (per head, (batch, seq, heads, d_head),
  q and k before rotary), ``attn_pattern.l`` ((batch, heads, query, key)),
  ``ln1_scale.l``/``ln1_normalized.l``/``ln2_...`` and ``ln_final`` (output of the final norm,
  which is what Hugging Face reports as the last ``hidden_states``);
- every TransformerLens name for these: ``blocks.l.hook_resid_pre``, ``blocks.l.hook_resid_mid``,
  ``blocks.l.hook_resid_post``, ``blocks.l.hook_attn_out``, ``blocks.l.hook_mlp_out``,
  ``blocks.l.mlp.hook_pre``, ``blocks.l.mlp.hook_pre_linear``, ``blocks.l.mlp.hook_post``,
  ``blocks.l.attn.hook_q``/``hook_k``/``hook_v``/``hook_z``/``hook_pattern``,
  ``blocks.l.ln1.hook_scale``/``hook_normalized`` (and ``ln2``), ``hook_embed``,
  ``hook_pos_embed``, ``ln_final.hook_scale``, ``ln_final.hook_normalized``. Each equals
  TransformerLens' value on the unprocessed model (``from_pretrained_no_processing``):
  ``*.hook_normalized`` is the norm's input centred (LayerNorm) and divided by its scale,
  *before* the norm's weight and bias -- unlike ``ln_final``, which is after them;
- any module path of the model itself (``transformer.h.3``, ``gpt_neox.layers.3.mlp.act``):
  the module's output (the first element when it returns a tuple).

``resid_post.{L-1}`` is the last block's output *before* the final norm (TransformerLens'
convention). Hugging Face's ``hidden_states[-1]`` is ``ln_final`` instead; ``hidden_states[l+1]``
equals ``resid_post.l`` for every other block and ``hidden_states[l]`` equals ``resid_pre.l``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from .models.arch import ArchSpec, arch_of, get_module

#: TransformerLens per-block hook suffix -> alias.
_TL_NAMES = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "mlp.hook_pre": "mlp_pre",
    "mlp.hook_pre_linear": "mlp_pre_linear",
    "mlp.hook_post": "mlp_post",
    "attn.hook_q": "attn_q",
    "attn.hook_k": "attn_k",
    "attn.hook_v": "attn_v",
    "attn.hook_z": "attn_z",
    "attn.hook_pattern": "attn_pattern",
    "ln1.hook_scale": "ln1_scale",
    "ln1.hook_normalized": "ln1_normalized",
    "ln2.hook_scale": "ln2_scale",
    "ln2.hook_normalized": "ln2_normalized",
}
ALIASES = tuple(_TL_NAMES.values())
#: TransformerLens model-level hook -> kind.
_GLOBAL = {
    "ln_final": "ln_final",
    "ln_final.hook_normalized": "ln_final_normalized",
    "ln_final.hook_scale": "ln_final_scale",
    "hook_embed": "embed",
    "hook_pos_embed": "pos_embed",
}
_ALIAS_RE = re.compile(r"^(" + "|".join(ALIASES) + r")\.(-?\d+)$")
_TL_RE = re.compile(r"^blocks\.(-?\d+)\.(" + "|".join(map(re.escape, _TL_NAMES)) + r")$")
#: Kinds whose value is (batch, seq, ...) per token; the others are not (``attn_pattern``).
PER_TOKEN = frozenset(ALIASES) - {"attn_pattern"} | {"ln_final", "ln_final_normalized", "ln_final_scale", "embed",
                                                     "pos_embed", "module"}  # fmt: skip


@dataclass(frozen=True)
class Site:
    """A resolved site.

    Attributes:
        name: the name the user asked for (keys of captured dicts).
        module_path: dotted path of the hooked module (``""`` is the root).
        read: ``"output"`` (forward hook) or ``"input"`` (forward pre-hook, first argument).
        kind: the alias family (``"resid_post"``, ...), ``"ln_final"`` or ``"module"``.
        layer: the block index for aliases, else ``None``.
        transform: how the hooked tensor becomes the site's value (``None``: as is; ``"q"``,
            ``"k"``, ``"v"``: one part of a projection, split into heads; ``"heads"``: split into
            heads; ``"pattern"``: the attention weights; ``"ln_scale"``, ``"ln_normalized"``:
            computed from the norm's input).
        layout: ``qkv_layout`` of the architecture, for ``"q"``/``"k"``/``"v"``.
        d_head: head width, for the head transforms.
        eps: the norm's epsilon, for the norm transforms; ``rms`` tells RMSNorm from LayerNorm.
    """

    name: str
    module_path: str
    read: Literal["output", "input"]
    kind: str
    layer: int | None = None
    transform: str | None = None
    layout: str = "separate"
    d_head: int = 0
    eps: float = 0.0
    rms: bool = False


def _block(spec: ArchSpec, n_layers: int, layer: str, name: str) -> tuple[int, str]:
    idx = int(layer)
    if not -n_layers <= idx < n_layers:
        raise ValueError(f"site {name!r}: layer {idx} out of range for {n_layers} blocks")
    idx %= n_layers
    return idx, f"{spec.blocks}.{idx}"


def _need(path: str | None, name: str, spec: ArchSpec, what: str) -> str:
    if path is None:
        raise ValueError(f"site {name!r}: the {spec.name!r} architecture spec names no {what}")
    return path


def _d_head(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    head_dim = getattr(cfg, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_heads", None)
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
    if not heads or not width:
        raise ValueError(f"cannot tell the head width of {type(model).__name__}")
    return width // heads


def _norm_site(model: nn.Module, name: str, path: str, kind: str, layer: int | None) -> Site:
    module = get_module(model, path)
    rms = not isinstance(module, nn.LayerNorm)
    eps = getattr(module, "eps", None) if not rms else getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(eps, float):
        raise ValueError(f"site {name!r}: {path} ({type(module).__name__}) has no float epsilon")
    transform = "ln_scale" if kind.endswith("scale") else "ln_normalized"
    return Site(name, path, "input", kind, layer, transform, eps=eps, rms=rms)


def _attn_site(model: nn.Module, name: str, kind: str, idx: int, block: str, spec: ArchSpec) -> Site:
    if kind == "attn_pattern":
        return Site(name, f"{block}.{spec.attn}", "output", kind, idx, "pattern")
    if kind == "attn_z":
        path = _need(spec.attn_o, name, spec, "attention output projection")
        return Site(name, f"{block}.{path}", "input", kind, idx, "heads", d_head=_d_head(model))
    qkv = _need(spec.qkv, name, spec, "q/k/v projections")  # type: ignore[arg-type]
    part = kind[-1]
    path = qkv["qkv".index(part)]
    return Site(name, f"{block}.{path}", "output", kind, idx, part, spec.qkv_layout, _d_head(model))


def _alias_site(model: nn.Module, name: str, kind: str, layer: str, spec: ArchSpec, n_layers: int) -> Site:
    idx, block = _block(spec, n_layers, layer, name)
    paths = {"attn_out": spec.attn, "mlp_out": spec.mlp, "mlp_pre": spec.mlp_in, "mlp_pre_linear": spec.mlp_in_linear}
    if kind == "resid_pre":
        return Site(name, block, "input", kind, idx)
    if kind == "resid_post":
        return Site(name, block, "output", kind, idx)
    if kind == "mlp_post":
        return Site(name, f"{block}.{spec.mlp_down}", "input", kind, idx)
    if kind in paths:
        return Site(name, f"{block}.{_need(paths[kind], name, spec, kind)}", "output", kind, idx)
    if kind == "resid_mid":
        if getattr(getattr(model, "config", None), "use_parallel_residual", False):
            raise ValueError(f"site {name!r}: attention and MLP run in parallel here, so there is no "
                             "resid_mid (TransformerLens has none for parallel blocks either)")  # fmt: skip
        return Site(name, f"{block}.{_need(spec.ln2, name, spec, 'ln2')}", "input", kind, idx)
    if kind.startswith(("ln1", "ln2")):
        ln = _need(spec.ln1 if kind.startswith("ln1") else spec.ln2, name, spec, kind[:3])
        return _norm_site(model, name, f"{block}.{ln}", kind, idx)
    return _attn_site(model, name, kind, idx, block, spec)


def _global_site(model: nn.Module, name: str, spec: ArchSpec) -> Site:
    kind = _GLOBAL[name]
    if kind == "ln_final":
        return Site(name, spec.final_norm, "output", kind)
    if kind == "embed":
        return Site(name, spec.token_embed, "output", kind)
    if kind == "pos_embed":
        path = _need(spec.pos_embed, name, spec, "learned position embedding (rotary models have none)")
        return Site(name, path, "output", kind)
    return _norm_site(model, name, spec.final_norm, kind, None)


def valid_site_names(model: nn.Module, arch: ArchSpec | str | None = None) -> list[str]:
    """Every alias and TransformerLens name for ``model`` (module paths are also valid)."""
    try:
        spec = arch_of(model, arch)
    except ValueError:
        return []
    n_layers = len(get_module(model, spec.blocks))  # type: ignore[arg-type]
    names = [f"{k}.{l}" for l in range(n_layers) for k in ALIASES]
    names += [f"blocks.{l}.{tl}" for l in range(n_layers) for tl in _TL_NAMES]
    return [*names, *_GLOBAL]


def parse_site_name(name: str) -> tuple[str, int | None] | None:
    """(kind, layer) of an alias or TransformerLens name, without a model; ``None`` otherwise."""
    alias, tl = _ALIAS_RE.match(name), _TL_RE.match(name)
    if alias:
        return alias[1], int(alias[2])
    if tl:
        return _TL_NAMES[tl[2]], int(tl[1])
    if name in _GLOBAL:
        return _GLOBAL[name], None
    return None


def resolve_site(model: nn.Module, name: str, arch: ArchSpec | str | None = None) -> Site:
    """Resolve the site ``name`` on ``model``; an unknown name raises listing the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"site must be a str, got {type(name).__name__}")
    alias, tl = _ALIAS_RE.match(name), _TL_RE.match(name)
    if alias or tl or name in _GLOBAL:
        spec = arch_of(model, arch)
        if name in _GLOBAL:
            site = _global_site(model, name, spec)
        else:
            n_layers = len(get_module(model, spec.blocks))  # type: ignore[arg-type]
            kind, layer = (alias[1], alias[2]) if alias else (_TL_NAMES[tl[2]], tl[1])  # type: ignore[index]
            site = _alias_site(model, name, kind, layer, spec, n_layers)
        get_module(model, site.module_path)  # fail here, not inside a forward
        return site
    modules = dict(model.named_modules())
    if name in modules:
        return Site(name, name, "output", "module")
    paths = [p for p in modules if p]
    shown = ", ".join(paths[:12]) + (f", ... ({len(paths)} in all)" if len(paths) > 12 else "")
    aliases = valid_site_names(model, arch)
    alias_text = ", ".join(aliases) if aliases else "(none: architecture not registered)"
    raise ValueError(f"unknown site {name!r} for {type(model).__name__}. Aliases: {alias_text}. Module paths: {shown}")


def resolve_sites(
    model: nn.Module, names: str | list[str] | tuple[str, ...], arch: ArchSpec | str | None = None
) -> list[Site]:
    """Resolve several sites at once; duplicates are refused (they would share a key)."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("sites must name at least one site")
    if len(set(names)) != len(names):
        raise ValueError(f"sites has duplicates: {names}")
    return [resolve_site(model, n, arch) for n in names]
