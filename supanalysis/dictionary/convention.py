"""What activations a dictionary was trained on, relative to the raw model, and where.

SAELens records ``model_from_pretrained_kwargs``: the TransformerLens processing of the model
whose activations trained the SAE (on top of ``from_pretrained_no_processing``). Only what is
*exactly* a function of the raw model's activation at the same site is reproduced:

- ``center_writing_weights`` on a LayerNorm model makes every write into the residual stream
  mean-zero; LayerNorm ignores the mean, so nothing else changes and each residual-stream
  site (``resid_pre/mid/post``, ``attn_out``, ``mlp_out``, ``hook_embed``, ``hook_pos_embed``)
  is the raw value minus its per-token mean. On an RMSNorm model the norm does not ignore the
  mean, the processed model computes something else, and it is refused.
- ``fold_ln`` folds norm weights into the next layer: residual, q/k/v, MLP and
  ``hook_normalized`` values are unchanged. ``center_unembed`` changes logits only.
- ``fold_value_biases`` moves b_V out of ``hook_v``/``hook_z`` and
  ``refactor_factored_attn_matrices`` rewrites q/k/v/z: SAEs at those sites are refused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

#: Sites whose value is the residual stream or a write into it.
RESIDUAL_KINDS = frozenset({"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "embed", "pos_embed"})
#: TransformerLens processing flags and the site kinds each rewrites beyond reach.
_REFUSED_AT = {
    "fold_value_biases": frozenset({"attn_v", "attn_z"}),
    "refactor_factored_attn_matrices": frozenset({"attn_q", "attn_k", "attn_v", "attn_z"}),
}
_NO_EFFECT = frozenset({"fold_ln", "center_unembed"})
#: from_pretrained keywords that choose where/how the model runs, not what it computes.
_RECORDED_ONLY = frozenset({
    "dtype", "torch_dtype", "device", "n_devices", "move_to_device", "default_prepend_bos",
    "default_padding_side", "trust_remote_code", "revision", "first_n_layers", "n_ctx",
    "use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in", "checkpoint_index",
    "checkpoint_value",
})  # fmt: skip


@dataclass(frozen=True)
class CaptureConvention:
    """How a dictionary's training activations relate to the raw model's at its site.

    Attributes:
        center: subtract each token's mean over the width (``center_writing_weights`` at a
            residual-stream site); idempotent, so already-centred input is unchanged.
        processing: the TransformerLens processing recorded with the dictionary
            (``model_from_pretrained_kwargs``), for reports; empty for a raw model.
    """

    center: bool = False
    processing: dict[str, Any] = field(default_factory=dict)

    def apply(self, x: Tensor) -> Tensor:
        """x (..., m) in the dictionary's convention."""
        return x - x.mean(-1, keepdim=True) if self.center else x

    def describe(self) -> str:
        """One line for a report."""
        if not self.processing:
            return "raw model activations"
        flags = ", ".join(f"{k}={v!r}" for k, v in sorted(self.processing.items()))
        how = "residual centred per token" if self.center else "no change at this site"
        return f"TransformerLens-processed ({flags}): {how}"

    def as_dict(self) -> dict[str, Any]:
        return {"center": self.center, "processing": dict(self.processing), "description": self.describe()}


RAW = CaptureConvention()


def convention_from_tl_kwargs(kwargs: dict[str, Any], hook_name: str | None, where: str) -> CaptureConvention:
    """The convention of an SAE trained on ``HookedTransformer.from_pretrained_no_processing(
    **kwargs)`` at ``hook_name``; raises ValueError naming a setting that cannot be reproduced."""
    from ..sites import parse_site_name

    unknown = sorted(set(kwargs) - _NO_EFFECT - set(_REFUSED_AT) - {"center_writing_weights"} - _RECORDED_ONLY)
    if unknown:
        raise ValueError(f"{where}: model_from_pretrained_kwargs {unknown} are not understood, so the "
                         "activations the SAE expects cannot be reproduced")  # fmt: skip
    parsed = parse_site_name(hook_name) if isinstance(hook_name, str) else None
    kind = parsed[0] if parsed else None
    for flag, kinds in _REFUSED_AT.items():
        if kwargs.get(flag) and (kind is None or kind in kinds):
            raise ValueError(f"{where}: {flag}=True rewrites the activations at hook_name={hook_name!r}; "
                             "they are not a function of the raw model's activation there")  # fmt: skip
    center = bool(kwargs.get("center_writing_weights"))
    if center and kind is None:
        raise ValueError(f"{where}: center_writing_weights=True with hook_name={hook_name!r}: cannot tell "
                         "whether that site is in the residual stream")  # fmt: skip
    return CaptureConvention(center and kind in RESIDUAL_KINDS, dict(kwargs))


def _declared_site(dictionary: nn.Module) -> tuple[str, str] | None:
    meta = getattr(dictionary, "metadata", {}) or {}
    for key in ("hook_name", "hookpoint"):
        if isinstance(meta.get(key), str) and meta[key]:
            return key, meta[key]
    return None


def _resolve_declared(model: nn.Module, key: str, name: str):
    from ..sites import resolve_site

    candidates = [name]
    prefix = getattr(model, "base_model_prefix", "")
    if key == "hookpoint" and prefix:
        candidates.append(f"{prefix}.{name}")  # sparsify names modules of the base model
    for candidate in candidates:
        try:
            return resolve_site(model, candidate)
        except ValueError:
            continue
    return None


def check_dictionary_site(dictionary: nn.Module, site: str, model: nn.Module, force: bool = False) -> None:
    """Raise ValueError when ``dictionary`` declares a training site (SAELens ``hook_name``,
    sparsify ``hookpoint``) other than ``site`` of ``model``, or a capture convention the
    model cannot reproduce. ``force=True`` turns the site mismatch into a warning. A
    dictionary that declares no site passes."""
    from ..sites import resolve_site

    used = resolve_site(model, site)
    convention = getattr(dictionary, "capture_convention", RAW)
    if convention.center and any(not isinstance(m, nn.LayerNorm) for m in _norms(model)):
        raise ValueError("the dictionary was trained with center_writing_weights=True; this model's norms are "
                         "not LayerNorm, so TransformerLens' centring changed what it computes and the "
                         "training activations cannot be derived from the raw model")  # fmt: skip
    declared = _declared_site(dictionary)
    if declared is None:
        return
    key, name = declared
    trained = _resolve_declared(model, key, name)
    same = trained is not None and (trained.module_path, trained.read, trained.transform) == (
        used.module_path, used.read, used.transform)  # fmt: skip
    if getattr(dictionary, "transcoder", False) and trained is not None:
        same = trained.module_path == used.module_path  # a transcoder reads its module's input
    if same:
        return
    where = "which does not exist on this model" if trained is None else f"= {trained.module_path} ({trained.read})"
    msg = (f"the dictionary was trained at {key}={name!r} ({where}) but is used at site {site!r} "
           f"= {used.module_path} ({used.read}); pass force=True to use it anyway")  # fmt: skip
    if not force:
        raise ValueError(msg)
    warnings.warn(msg, stacklevel=2)


def _norms(model: nn.Module) -> list[nn.Module]:
    from ..models.arch import arch_of, get_module

    try:
        spec = arch_of(model)
    except ValueError:
        return []
    return [get_module(model, spec.final_norm)]
