"""The pieces of the TopK SAE recipe that keep latents alive (Gao et al. 2024; Anthropic 2023).

Initialisation (unit decoder rows, encoder = their transpose, ``b_dec`` at the geometric
median), the learning-rate schedule (warm-up, then linear or cosine decay), the decoder's
unit-norm constraint, and resampling of latents dead for too long onto directions the
dictionary explains worst.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .activations import TopK
from .base import Dictionary


def geometric_median(x: Tensor, steps: int, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's iterations from the mean: the point minimising Σ‖x_i - c‖ over rows of x
    (T, m); unlike the mean it is not dragged by a few huge activations."""
    c = x.mean(0)
    for _ in range(steps):
        w = 1 / (x - c).norm(dim=1).clamp_min(eps)
        c = (w[:, None] * x).sum(0) / w.sum()
    return c


def init_dictionary(x: Tensor, d_sae: int, k: int, seed: int, site: str | None, b_dec_init: str,
                    median_steps: int) -> Dictionary:  # fmt: skip
    """A TopK dictionary for activations like x (B, m): random unit decoder rows (seeded,
    drawn on the CPU so every device gets the same ones), encoder their transpose."""
    d_in = x.shape[1]
    sae = Dictionary(d_in, d_sae, TopK(k), device=x.device, metadata={"hook_name": site})
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_sae, d_in, generator=gen, dtype=torch.float32).to(x.device)
    w /= w.norm(dim=1, keepdim=True)
    x = x.float()
    centre = geometric_median(x, median_steps) if b_dec_init == "median" else x.mean(0)
    with torch.no_grad():
        sae._W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        # Centred inputs let every latent spend itself on variance rather than the offset.
        sae.b_dec.copy_(centre)
    return sae


def lr_factor(tokens: int, n_tokens: int, warmup: int, decay: str, decay_start: float) -> float:
    """Multiplier of the base learning rate after ``tokens`` of ``n_tokens``: linear warm-up
    over ``warmup`` tokens, constant, then from ``decay_start`` · n_tokens a linear or cosine
    decay to 0 at the end (``decay="none"``: constant)."""
    f = min(1.0, (tokens + 1) / warmup) if warmup > 0 else 1.0
    start = decay_start * n_tokens
    if decay == "none" or tokens < start or n_tokens <= start:
        return f
    t = min(1.0, (tokens - start) / (n_tokens - start))
    return f * ((1 - t) if decay == "linear" else 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def project_decoder_grad(sae: Dictionary) -> None:
    """Remove each decoder row's gradient component along the (unit) row: renormalisation
    fixes the norm, so that component would only fight Adam's moment estimates.

    Without no_grad the in-place update on the gradient, a product with the decoder (a
    Parameter), is recorded by autograd: each step's gradient then holds a graph that holds
    the last, and a training run keeps two tensors per step alive (GBs over a long run)."""
    w, g = sae._W_dec, sae._W_dec.grad
    if g is not None:
        g.sub_((g * w).sum(1, keepdim=True) * w)


@torch.no_grad()
def renormalise_decoder(sae: Dictionary) -> None:
    sae._W_dec.div_(sae._W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def resample_dead(
    sae: Dictionary, opt: torch.optim.Optimizer, x: Tensor, dead: Tensor, seed: int, step: int, enc_scale: float = 0.2
) -> int:
    """Point each dead latent at the residual of a token sampled ∝ its squared error.

    The decoder row becomes the unit residual, the encoder column the same direction scaled
    to ``enc_scale`` × the live columns' mean norm (0.2, Anthropic 2023: it starts weak, so
    it cannot wreck the reconstruction of the tokens it wins; at full norm it overshoots),
    ``b_enc`` 0, and its Adam moments are cleared. Sampling uses a CPU generator seeded by
    (seed, step), so a resumed run resamples exactly like an uninterrupted one.

    Args:
        x: the current batch (B, m).
        dead: bool (n,) latents to resample.

    Returns: the number of latents resampled.
    """
    ids = dead.nonzero().squeeze(1)
    if ids.numel() == 0:
        return 0
    idx, vals = sae.encode(x, sparse=True)
    residual = (x - sae.decode_sparse(idx, vals)).float()
    weights = residual.pow(2).sum(1).cpu().double()
    if not bool(weights.sum() > 0):
        return 0
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    pick = torch.multinomial(weights, ids.numel(), replacement=True, generator=gen).to(x.device)
    dirs = residual[pick]
    dirs /= dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive = ~dead
    scale = sae.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
    sae._W_dec[ids] = dirs
    sae.W_enc[:, ids] = dirs.T * (enc_scale * scale)
    sae.b_enc[ids] = 0
    for p, sel in ((sae.W_enc, (slice(None), ids)), (sae.b_enc, ids), (sae._W_dec, ids)):
        for buf in opt.state.get(p, {}).values():
            if isinstance(buf, Tensor) and buf.shape == p.shape:
                buf[sel] = 0
    return int(ids.numel())
