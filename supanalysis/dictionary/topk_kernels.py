"""The TopK SAE training step as one autograd function: dense encoder GEMM, sparse the rest.

Shapes: x (B, m); W_enc (m, n); b_enc (n,); W_dec (n, m); b_dec (m,); k active latents per
token, ``aux_k`` dead latents per token for the AuxK loss (Gao et al. 2024).

Forward: ``pre = (x - b_dec) @ W_enc + b_enc`` (one GEMM), the top k of ``pre``, and the
reconstruction gathered from k decoder rows per token (``embedding_bag``), never a dense
(B, n) code matrix. Backward, on the CPU with k << n: only the selected (token, latent)
pairs are touched; the decoder gradient is a scatter of k rows per token, the encoder
gradient a scatter of k columns, the input gradient a gather of k encoder columns (all
sequential, hence exact). Otherwise (CUDA, where a float scatter uses atomics whose order
would vary between runs, or AuxK's k_aux ~ n/16) the weight gradients are GEMMs over the
scattered codes, which are deterministic. The step never reads a value back to the host.

:func:`dense_topk_sae_loss` is the plain-PyTorch reference (dense codes, autograd): the
ground truth of the tests and the baseline of the benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: tokens per chunk of the sparse backward, so the (chunk, k, m) gathers stay in cache.
_CHUNK_ELEMS = 1 << 21
#: the backward scatters (rather than multiplying dense codes) when k * this <= n.
_SPARSE_RATIO = 32


def _sq_over_var(err: Tensor, target: Tensor) -> Tensor:
    """Σ err² / Σ (target - mean(target))²: FVU when err = reconstruction - target."""
    total = (target - target.mean(0)).pow(2).sum()
    return err.pow(2).sum() / total.clamp_min(torch.finfo(target.dtype).tiny)


def _gather_dot(rows: Tensor, idx: Tensor, upstream: Tensor) -> Tensor:
    """(B, k): rows[idx[b, j]] · upstream[b], in token chunks (rows (n, m), upstream (B, m))."""
    b, k = idx.shape
    step = max(1, _CHUNK_ELEMS // max(k * rows.shape[1], 1))
    out = torch.empty(b, k, dtype=upstream.dtype, device=upstream.device)
    for s in range(0, b, step):
        picked = F.embedding(idx[s : s + step], rows)  # (c, k, m)
        out[s : s + step] = torch.bmm(picked, upstream[s : s + step, :, None]).squeeze(-1)
    return out


def _scatter_rows(n: int, idx: Tensor, weight: Tensor, rows: Tensor, out: Tensor) -> Tensor:
    """out (n, m) += Σ_b,j weight[b, j] · rows[b] into row idx[b, j] (rows (B, m))."""
    b, k = idx.shape
    step = max(1, _CHUNK_ELEMS // max(k * rows.shape[1], 1))
    for s in range(0, b, step):
        src = weight[s : s + step, :, None] * rows[s : s + step, None, :]
        out.index_add_(0, idx[s : s + step].reshape(-1), src.reshape(-1, rows.shape[1]))
    return out


def _sparse_backward(n: int, k: int, device: torch.device) -> bool:
    # Scatter wins only while k is far below n; on CUDA a float scatter uses atomics, whose
    # order (and so the rounding) would vary run to run.
    return device.type == "cpu" and k * _SPARSE_RATIO <= n


def _set_grads(grads: dict[str, Tensor], xc: Tensor, W_enc_t: Tensor, W_dec: Tensor, ids: Tensor, a: Tensor,
               u: Tensor) -> None:  # fmt: skip
    """Add one selection's gradients: latents ids (B, k) with codes a (B, k), upstream u (B, m)."""
    n = W_dec.shape[0]
    if _sparse_backward(n, ids.shape[1], u.device):
        g_pre = _gather_dot(W_dec, ids, u) * (a > 0)
        _scatter_rows(n, ids, a, u, grads["W_dec"])
        _scatter_rows(n, ids, g_pre, xc, grads["W_enc_t"])
        grads["b_enc"].index_add_(0, ids.reshape(-1), g_pre.reshape(-1))
    else:
        # Dense codes, then GEMMs: indices within a row are distinct, so the scatter is exact.
        g_pre = torch.mm(u, W_dec.T).gather(1, ids) * (a > 0)
        codes = torch.zeros(u.shape[0], n, dtype=u.dtype, device=u.device).scatter_(1, ids, a)
        grads["W_dec"].addmm_(codes.T, u)
        codes.zero_().scatter_(1, ids, g_pre)
        grads["W_enc_t"].addmm_(codes.T, xc)
        grads["b_enc"] += codes.sum(0)
    grads["xc"] += F.embedding_bag(ids, W_enc_t, per_sample_weights=g_pre, mode="sum")


class _TopKSAELoss(torch.autograd.Function):
    """loss = FVU(x̂, x) + aux_coef · FVU(ê, x - x̂) with ê from the aux_k strongest dead latents."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, k, dead, aux_k, aux_coef):  # type: ignore[override]
        xc = x - b_dec
        pre = torch.addmm(b_enc, xc, W_enc)
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        act = torch.relu(vals)
        err = F.embedding_bag(idx, W_dec, per_sample_weights=act, mode="sum") + b_dec - x
        main = _sq_over_var(err, x)
        total = ((x - x.mean(0)).pow(2).sum()).clamp_min(torch.finfo(x.dtype).tiny)
        saved = [xc, W_enc, W_dec, idx, act, err * (2 / total)]
        aux = torch.zeros((), dtype=x.dtype, device=x.device)
        if dead is not None and aux_k > 0:
            # Dead latents alone compete (-inf elsewhere, whose ReLU'd code is 0): no host sync
            # is needed to count them, and with none dead the aux loss is 0 with no gradient.
            avals, aidx = pre.masked_fill(~dead, float("-inf")).topk(aux_k, dim=-1, sorted=False)
            aact = torch.relu(avals)
            aerr = F.embedding_bag(aidx, W_dec, per_sample_weights=aact, mode="sum") + err
            aux = torch.where(dead.any(), _sq_over_var(aerr, -err), aux)
            rtotal = ((err - err.mean(0)).pow(2).sum()).clamp_min(torch.finfo(x.dtype).tiny)
            saved += [aidx, aact, aerr * (2 * aux_coef / rtotal) * dead.any()]
        ctx.save_for_backward(*saved)
        ctx.n = W_enc.shape[1]
        main_out = main.clone()
        ctx.mark_non_differentiable(main_out, aux, idx, act)
        return main + aux_coef * aux, main_out, aux, idx, act

    @staticmethod
    def backward(ctx, g, *_unused):  # type: ignore[override]
        xc, W_enc, W_dec, idx, act, up, *rest = ctx.saved_tensors
        sets = [(idx, act, up * g)]
        if rest:
            sets.append((rest[0], rest[1], rest[2] * g))
        grads = {
            "W_dec": torch.zeros_like(W_dec),
            "W_enc_t": torch.zeros_like(W_dec),
            "b_enc": torch.zeros(ctx.n, dtype=xc.dtype, device=xc.device),
            "xc": torch.zeros_like(xc),
        }
        W_enc_t = W_enc.T.contiguous()
        for ids, a, u in sets:
            _set_grads(grads, xc, W_enc_t, W_dec, ids, a, u)
        g_b_dec = sets[0][2].sum(0) - grads["xc"].sum(0)
        return None, grads["W_enc_t"].T, grads["b_enc"], grads["W_dec"], g_b_dec, None, None, None, None


def topk_sae_loss(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    k: int,
    dead: Tensor | None = None,
    aux_k: int = 0,
    aux_coef: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One TopK SAE training loss with a sparse backward.

    Args:
        x: activations (B, m); W_enc (m, n), b_enc (n,), W_dec (n, m), b_dec (m,).
        k: active latents per token.
        dead: bool (n,) latents counted dead, or ``None`` for no AuxK loss.
        aux_k: dead latents per token reconstructing the residual (must be <= n).
        aux_coef: weight of the AuxK loss.

    Returns:
        (loss scalar with gradient, main FVU, AuxK FVU, indices (B, k), codes (B, k)).
    """
    return _TopKSAELoss.apply(x, W_enc, b_enc, W_dec, b_dec, k, dead, aux_k, aux_coef)


def dense_topk_sae_loss(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    k: int,
    dead: Tensor | None = None,
    aux_k: int = 0,
    aux_coef: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`topk_sae_loss` with dense (B, n) codes and autograd throughout.

    Returns (loss, main FVU, AuxK FVU)."""
    pre = (x - b_dec) @ W_enc + b_enc
    vals, idx = pre.topk(k, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    x_hat = codes @ W_dec + b_dec
    main = _sq_over_var(x_hat - x, x)
    aux = torch.zeros((), dtype=x.dtype, device=x.device)
    if dead is not None and aux_k > 0 and bool(dead.any()):
        avals, aidx = pre.masked_fill(~dead, float("-inf")).topk(aux_k, dim=-1)
        acodes = torch.zeros_like(pre).scatter(-1, aidx, torch.relu(avals))
        residual = (x - x_hat).detach()
        aux = _sq_over_var(acodes @ W_dec - residual, residual)
    return main + aux_coef * aux, main, aux
