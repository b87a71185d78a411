"""The shape of a transformer and its exact parameter counts (SCIENCE.md, "Per model")."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .arch import ArchSpec, arch_of, get_module

#: Sites with one neuron per residual dimension; ``mlp_post`` has d_ff neurons.
RESID_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")


@dataclass(frozen=True)
class ModelShape:
    """What :func:`describe` reports about a model.

    Attributes:
        architecture: family name of the :class:`~supanalysis.models.ArchSpec` used.
        n_layers: number of blocks L.
        d_model: residual stream width d.
        d_ff: MLP hidden width (neurons at the ``mlp_post`` site).
        n_heads: attention (query) heads.
        vocab_size: rows of the token embedding.
        total_params: every distinct parameter tensor counted once.
        non_embedding_params: ``total_params`` minus the token embedding, the position
            embedding and the unembedding (the latter only when it is not tied to the token
            embedding, so tied weights are subtracted once). Final norms, biases and
            attention/MLP weights all count.
        kaplan_params: Kaplan et al.'s approximation 12·L·d².
        aspect_ratio: d / L.
        neurons_per_site: neurons m of one layer's site of each kind
            (``resid_pre``/``resid_post``/``attn_out``/``mlp_out``: d; ``mlp_post``: d_ff).
    """

    architecture: str
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    vocab_size: int
    total_params: int
    non_embedding_params: int
    kaplan_params: int
    aspect_ratio: float
    neurons_per_site: dict[str, int] = field(default_factory=dict)

    def total_neurons(self, kind: str) -> int:
        """M = Σ over the L layers of one site kind's neurons, e.g. ``total_neurons("mlp_post")``."""
        if kind not in self.neurons_per_site:
            raise ValueError(f"kind={kind!r} unknown; one of {sorted(self.neurons_per_site)}")
        return self.n_layers * self.neurons_per_site[kind]


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    # transformers' Conv1D (GPT-2) stores weight as (in_features, out_features).
    if type(module).__name__ == "Conv1D":
        return int(module.weight.shape[0])
    raise ValueError(f"cannot read the input width of {type(module).__name__}")


def _unique_numel(modules: list[nn.Module]) -> tuple[int, set[int]]:
    """Parameter count over modules with each tensor counted once (tied weights)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total, seen


def _config_heads(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("n_heads", "num_attention_heads", "n_head"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    return None


def describe(
    model: nn.Module,
    *,
    arch: ArchSpec | str | None = None,
    n_layers: int | None = None,
    d_model: int | None = None,
    d_ff: int | None = None,
    n_heads: int | None = None,
    vocab_size: int | None = None,
) -> ModelShape:
    """Describe ``model``'s shape with exact parameter counts.

    Widths are read from the weights themselves (embedding and MLP output projection), so
    they are right whatever the config calls them. For a model outside the registry, pass
    ``arch=ArchSpec(...)``; the keyword fields override anything inferred, and when some
    cannot be inferred the error names them.
    """
    try:
        spec = arch_of(model, arch)
    except ValueError as err:
        spec, why = None, str(err)
    inferred: dict[str, int | None] = {"n_heads": _config_heads(model)}
    if spec is not None:
        blocks = get_module(model, spec.blocks)
        embed = get_module(model, spec.token_embed)
        inferred["n_layers"] = len(blocks)  # type: ignore[arg-type]
        inferred["vocab_size"], inferred["d_model"] = (int(s) for s in embed.weight.shape)
        inferred["d_ff"] = _in_features(get_module(blocks[0], spec.mlp_down))  # type: ignore[index]
    given = dict(n_layers=n_layers, d_model=d_model, d_ff=d_ff, n_heads=n_heads, vocab_size=vocab_size)
    values = {k: given[k] if given[k] is not None else inferred.get(k) for k in given}
    missing = [k for k, v in values.items() if v is None]
    if missing or spec is None:
        reason = f" ({why})" if spec is None else ""
        raise ValueError(
            f"describe could not infer {missing or ['the embedding modules']} for "
            f"{type(model).__name__}{reason}; pass them, e.g. describe(model, "
            + ", ".join(f"{k}=..." for k in missing or ["arch=ArchSpec(...)"])
            + ")"
        )

    total, _ = _unique_numel([model])
    embedding_modules = [get_module(model, spec.token_embed), get_module(model, spec.unembed)]
    if spec.pos_embed is not None:
        embedding_modules.append(get_module(model, spec.pos_embed))
    embedding, _ = _unique_numel(embedding_modules)
    L, d, dff = values["n_layers"], values["d_model"], values["d_ff"]
    return ModelShape(
        architecture=spec.name,
        n_layers=L,
        d_model=d,
        d_ff=dff,
        n_heads=values["n_heads"],
        vocab_size=values["vocab_size"],
        total_params=total,
        non_embedding_params=total - embedding,
        kaplan_params=12 * L * d * d,
        aspect_ratio=d / L,
        neurons_per_site={**dict.fromkeys(RESID_SITES, d), "mlp_post": dff},
    )
