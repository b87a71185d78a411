"""Read activations out of a model: a hook context manager and a streaming source.

``with capture(model, ["resid_post.3"]) as cache: model(ids)`` then ``cache["resid_post.3"]``
is (batch, seq, m). :class:`ActivationSource` streams ``{site: Tensor[T, m]}`` batches over
any number of tokens, one forward per token batch, stopped as soon as every requested
site has fired, so memory is bounded by one batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .models.arch import ArchSpec, get_module
from .sites import PER_TOKEN, Site, resolve_sites


class _StopForward(Exception):
    """Raised from a hook to abandon the rest of a forward once every site has fired."""


class ActivationCache(Mapping[str, Tensor]):
    """Activations of the latest forward, keyed by site name.

    Each value is what the site produced, detached, e.g. (batch, seq, m). A site that fires
    several times in one forward keeps its last value.
    """

    def __init__(self, sites: list[Site]) -> None:
        self.sites = {s.name: s for s in sites}
        self._data: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._data:
            state = "requested but has not fired yet" if name in self.sites else "not captured"
            raise KeyError(f"site {name!r} {state}; captured sites: {sorted(self._data)}")
        return self._data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()


def _first_tensor(value: Any, site: Site) -> Tensor:
    # Blocks and attention modules often return tuples (hidden, weights, cache...).
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, Tensor):
        raise TypeError(f"site {site.name!r} ({site.module_path}) produced {type(value).__name__}")
    return value


def _heads(t: Tensor, d_head: int) -> Tensor:
    return t.unflatten(-1, (-1, d_head))


def _qkv_part(t: Tensor, site: Site) -> Tensor:
    """One of q/k/v, (..., heads, d_head), from its projection's output."""
    part = "qkv".index(site.transform)  # type: ignore[arg-type]
    if site.layout == "split":  # q | k | v, each heads * d_head wide
        return _heads(t.chunk(3, dim=-1)[part], site.d_head)
    if site.layout == "interleaved":  # per head: q | k | v
        return t.unflatten(-1, (-1, 3 * site.d_head))[..., part * site.d_head : (part + 1) * site.d_head]
    return _heads(t, site.d_head)


def _norm(t: Tensor, site: Site) -> Tensor:
    # TransformerLens' order of operations: centre (LayerNorm), scale = sqrt(mean(x^2) + eps),
    # divide; in float32 for half-precision inputs, cast back as it does.
    x = t if t.dtype in (torch.float32, torch.float64) else t.float()
    if not site.rms:
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + site.eps).sqrt()
    return scale if site.transform == "ln_scale" else (x / scale).to(t.dtype)


def _site_value(value: Any, site: Site) -> Tensor:
    """The site's tensor from what its hook saw (a module's input or output)."""
    if site.transform == "pattern":
        weights = value[1] if isinstance(value, (tuple, list)) and len(value) > 1 else None
        if not isinstance(weights, Tensor):
            raise TypeError(f"site {site.name!r}: {site.module_path} returned no attention weights "
                            "(its attention implementation does not compute them)")  # fmt: skip
        return weights
    t = _first_tensor(value, site)
    if site.transform in ("q", "k", "v"):
        return _qkv_part(t, site)
    if site.transform == "heads":
        return _heads(t, site.d_head)
    if site.transform in ("ln_scale", "ln_normalized"):
        return _norm(t, site)
    return t


@contextlib.contextmanager
def _eager_attention(model: nn.Module, sites: list[Site]) -> Iterator[None]:
    """Switch a Hugging Face model to eager attention while a pattern site is hooked: fused
    kernels (sdpa, flash) never materialise the attention weights."""
    config = getattr(model, "config", None)
    old = getattr(config, "_attn_implementation", None)
    switch = any(s.transform == "pattern" for s in sites) and old not in (None, "eager")
    if switch:
        model.set_attn_implementation("eager")  # type: ignore[operator]
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(old)  # type: ignore[operator]


def _install(
    model: nn.Module, site: Site, cache: ActivationCache, stop_when_all: bool
) -> torch.utils.hooks.RemovableHandle:
    module = get_module(model, site.module_path)

    def store(value: Any) -> None:
        cache._data[site.name] = _site_value(value, site).detach()
        if stop_when_all and len(cache._data) == len(cache.sites):
            raise _StopForward

    if site.read == "output":
        return module.register_forward_hook(lambda _m, _args, out: store(out))

    def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        # Blocks get hidden_states positionally in most families, by keyword in some.
        store(args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None)))

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


@contextlib.contextmanager
def capture(
    model: nn.Module,
    sites: str | list[str] | tuple[str, ...],
    *,
    arch: ArchSpec | str | None = None,
    stop_early: bool = False,
) -> Iterator[ActivationCache]:
    """Hook ``sites`` of ``model`` for the duration of the ``with`` block.

    Args:
        model: the model; every site is resolved before any hook is installed.
        sites: site names (see :mod:`supanalysis.sites`).
        arch: force an architecture spec for alias resolution.
        stop_early: abandon each forward once every site has fired; use
            :func:`run_to_sites` to call the model, which swallows the stop signal.

    The hooks are removed when the block exits, also when it raises.
    """
    resolved = resolve_sites(model, sites, arch)
    cache = ActivationCache(resolved)
    handles = []
    try:
        with _eager_attention(model, resolved):
            for site in resolved:
                handles.append(_install(model, site, cache, stop_early))
            yield cache
    finally:
        for handle in handles:
            handle.remove()


def _call_kwargs(model: nn.Module) -> dict[str, Any]:
    # A KV cache only costs memory here; Hugging Face models build one unless told not to.
    return {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}


def run_to_sites(model: nn.Module, ids: Tensor, cache: ActivationCache) -> None:
    """Run ``model(ids)`` under a ``capture(..., stop_early=True)``, stopping after the last site."""
    cache.clear()
    with contextlib.suppress(_StopForward):
        model(ids, **_call_kwargs(model))
    missing = set(cache.sites) - set(cache._data)
    if missing:
        raise RuntimeError(f"sites {sorted(missing)} did not fire during the forward")


class ActivationSource:
    """Stream ``{site: Tensor[T, m]}`` batches of activations from a model.

    Args:
        model: the model (eval mode is the caller's business; :func:`models.load` sets it).
        tokens: an iterable of int64 token id batches (batch, seq), e.g. a
            :class:`supanalysis.data.TokenSequences`. When it has ``keep_mask(ids)``
            (batch, seq) -> bool, the positions it rejects (BOS, pad) are dropped.
        sites: sites to read, all in the same forward.
        max_tokens: stop after this many kept tokens (the last batch is truncated).
        device: where the token ids go (default: the model's device); activations stay
            there, so on a GPU they feed the kernels without a copy.
        dtype: cast activations (``None`` keeps the model's dtype).
        progress: show a tqdm bar in tokens (its rate is tokens/s).

    Iterating runs one forward per token batch under ``torch.no_grad()``; each
    yielded dict maps every site name to a (T, m) tensor with T the batch's kept tokens.
    The forward is abandoned once every site has fired, so a module path that runs
    several times per forward yields its first call.
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: Iterable[Tensor],
        sites: str | list[str] | tuple[str, ...],
        *,
        max_tokens: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = True,
        arch: ArchSpec | str | None = None,
    ) -> None:
        self.model, self.tokens, self.arch = model, tokens, arch
        resolved = resolve_sites(model, sites, arch)
        not_per_token = [s.name for s in resolved if s.kind not in PER_TOKEN]
        if not_per_token:
            raise ValueError(f"sites {not_per_token} are not per-token activations (attention patterns "
                             "are (batch, heads, query, key)); read them with capture()")  # fmt: skip
        self.sites = [s.name for s in resolved]
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.max_tokens, self.dtype, self.progress = max_tokens, dtype, progress
        if device is None:
            param = next(model.parameters(), None)
            device = param.device if param is not None else "cpu"
        self.device = torch.device(device)
        #: tokens yielded and seconds spent by the latest iteration (for throughput reports)
        self.tokens_seen, self.seconds = 0, 0.0

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        keep: Callable[[Tensor], Tensor] | None = getattr(self.tokens, "keep_mask", None)
        bar = tqdm(total=self.max_tokens, unit="tok", unit_scale=True, disable=not self.progress)
        self.tokens_seen, start = 0, time.perf_counter()
        try:
            with capture(self.model, self.sites, arch=self.arch, stop_early=True) as cache:
                for ids in self.tokens:
                    ids = torch.as_tensor(ids)
                    mask = keep(ids).reshape(-1).to(self.device) if keep is not None else None
                    with torch.no_grad():
                        run_to_sites(self.model, ids.to(self.device, torch.int64), cache)
                    batch = {}
                    for name in self.sites:
                        act = cache[name]
                        # (batch, seq, ...) -> (tokens, width): per-head sites flatten their heads,
                        # as SAELens' hook_z dictionaries expect; a position embedding computed
                        # once for the whole batch is broadcast to it.
                        if act.shape[0] == 1 and ids.dim() == 2:
                            act = act.expand(ids.shape[0], *act.shape[1:])
                        act = act.reshape(ids.numel(), -1)
                        if mask is not None:
                            act = act[mask]
                        batch[name] = act if self.dtype is None else act.to(self.dtype)
                    cache.clear()  # drop references so the batch is the only live copy
                    n = batch[self.sites[0]].shape[0]
                    if self.max_tokens is not None and self.tokens_seen + n >= self.max_tokens:
                        n = self.max_tokens - self.tokens_seen
                        batch = {k: v[:n] for k, v in batch.items()}
                    self.tokens_seen += n
                    self.seconds = time.perf_counter() - start
                    bar.update(n)
                    if n:
                        yield batch
                    if self.max_tokens is not None and self.tokens_seen >= self.max_tokens:
                        break
        finally:
            bar.close()
            self.seconds = time.perf_counter() - start
