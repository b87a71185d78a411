"""Sites: names for where activations are read, resolved to a module and a hook.

Accepted names, for a model with L blocks (``l`` in ``0..L-1``, negative counts from the end):

- aliases ``resid_pre.l`` (input of block l), ``resid_post.l`` (output of block l),
  ``attn_out.l``, ``mlp_out.l`` (outputs of the attention and MLP modules), ``mlp_post.l``
  (MLP hidden after the nonlinearity -- the input of the MLP's output projection, so it
  includes the gate product in gated MLPs; width d_ff) and ``ln_final`` (output of the
  final norm, which is what Hugging Face reports as the last ``hidden_states``);
- TransformerLens names ``blocks.l.hook_resid_pre``, ``blocks.l.hook_resid_post``,
  ``blocks.l.hook_attn_out``, ``blocks.l.hook_mlp_out``, ``blocks.l.mlp.hook_post``,
  ``ln_final.hook_normalized``;
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

ALIASES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_post")
_TL_NAMES = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "mlp.hook_post": "mlp_post",
}
_ALIAS_RE = re.compile(r"^(" + "|".join(ALIASES) + r")\.(-?\d+)$")
_TL_RE = re.compile(r"^blocks\.(-?\d+)\.(" + "|".join(map(re.escape, _TL_NAMES)) + r")$")
_FINAL = ("ln_final", "ln_final.hook_normalized")


@dataclass(frozen=True)
class Site:
    """A resolved site.

    Attributes:
        name: the name the user asked for (keys of captured dicts).
        module_path: dotted path of the hooked module (``""`` is the root).
        read: ``"output"`` (forward hook) or ``"input"`` (forward pre-hook, first argument).
        kind: the alias family (``"resid_post"``, ...), ``"ln_final"`` or ``"module"``.
        layer: the block index for aliases, else ``None``.
    """

    name: str
    module_path: str
    read: Literal["output", "input"]
    kind: str
    layer: int | None = None


def _block(spec: ArchSpec, n_layers: int, layer: str, name: str) -> tuple[int, str]:
    idx = int(layer)
    if not -n_layers <= idx < n_layers:
        raise ValueError(f"site {name!r}: layer {idx} out of range for {n_layers} blocks")
    idx %= n_layers
    return idx, f"{spec.blocks}.{idx}"


def _alias_site(name: str, kind: str, layer: str, spec: ArchSpec, n_layers: int) -> Site:
    idx, block = _block(spec, n_layers, layer, name)
    if kind == "resid_pre":
        return Site(name, block, "input", kind, idx)
    if kind == "resid_post":
        return Site(name, block, "output", kind, idx)
    if kind == "attn_out":
        return Site(name, f"{block}.{spec.attn}", "output", kind, idx)
    if kind == "mlp_out":
        return Site(name, f"{block}.{spec.mlp}", "output", kind, idx)
    return Site(name, f"{block}.{spec.mlp_down}", "input", kind, idx)


def valid_site_names(model: nn.Module, arch: ArchSpec | str | None = None) -> list[str]:
    """Every alias and TransformerLens name for ``model`` (module paths are also valid)."""
    try:
        spec = arch_of(model, arch)
    except ValueError:
        return []
    n_layers = len(get_module(model, spec.blocks))  # type: ignore[arg-type]
    names = [f"{k}.{l}" for l in range(n_layers) for k in ALIASES]
    names += [f"blocks.{l}.{tl}" for l in range(n_layers) for tl in _TL_NAMES]
    return [*names, *_FINAL]


def resolve_site(model: nn.Module, name: str, arch: ArchSpec | str | None = None) -> Site:
    """Resolve the site ``name`` on ``model``; an unknown name raises listing the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"site must be a str, got {type(name).__name__}")
    alias, tl = _ALIAS_RE.match(name), _TL_RE.match(name)
    if alias or tl or name in _FINAL:
        spec = arch_of(model, arch)
        n_layers = len(get_module(model, spec.blocks))  # type: ignore[arg-type]
        if name in _FINAL:
            return Site(name, spec.final_norm, "output", "ln_final")
        kind, layer = (alias[1], alias[2]) if alias else (_TL_NAMES[tl[2]], tl[1])  # type: ignore[index]
        site = _alias_site(name, kind, layer, spec, n_layers)
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
