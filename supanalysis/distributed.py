"""Data-parallel runs on torch.distributed (gloo on CPU, NCCL on GPU), launched with torchrun.

Every rank reads its own contiguous slice of the work (``shard_range``), accumulates with
the kernels, and the accumulators all-reduce exactly (their ``all_reduce`` methods). This
module holds the few collectives the pipeline needs beyond that, and interference over a
row-sharded W: each rank owns a row block; the other ranks' blocks are broadcast to
everyone in chunks of ``chunk`` rows, so no rank ever holds more than its block plus one
chunk, and the per-feature reductions come out equal to one device's.

Nothing here pickles: only tensors cross ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import nn

from .ops.interference import InterferenceResult, interference


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world(group=None) -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def init_from_env(device: str | None = None) -> tuple[int, int, str | None]:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1).

    Returns (rank, world size, device): NCCL with ``cuda:LOCAL_RANK`` when CUDA is visible
    and ``device`` does not ask for the CPU, gloo otherwise. Outside torchrun: (0, 1, device).
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1, device
    use_cuda = torch.cuda.is_available() and not (device or "").startswith("cpu")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def leave_process_group() -> None:
    """Destroy the default process group, then collect garbage at once.

    A gloo work object (or a tensor it holds) that survives in a reference cycle is otherwise
    freed during interpreter finalisation, where freeing it aborts the process ("terminate
    called without an active exception", SIGABRT) after all its work succeeded: measured in
    about one 2-rank exit of five without the collection, none in thirty with it.
    """
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous block [lo, hi) of ``n`` items that ``rank`` of ``world`` owns."""
    return n * rank // world, n * (rank + 1) // world


def all_gather_cat(t: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0, in rank order (lengths may differ)."""
    import torch.distributed as dist

    _, world = rank_world(group)
    if world == 1:
        return t
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    lengths = [int(s) for s in sizes]
    longest = max(lengths)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:k] for p, k in zip(parts, lengths)])


def all_reduce_sum(x: float, device: torch.device, group=None) -> float:
    """Sum a float over ranks in float64."""
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return float(t)


def broadcast_module(module: nn.Module, src: int = 0, group=None) -> nn.Module:
    """Overwrite every parameter and buffer of ``module`` with ``src``'s, in place.

    The module must have the same structure on every rank (same state_dict keys, shapes).
    """
    import torch.distributed as dist

    with torch.no_grad():
        for _, t in sorted(module.state_dict(keep_vars=True).items()):
            buf = t.data.contiguous()
            dist.broadcast(buf, src=src, group=group)
            if buf.data_ptr() != t.data.data_ptr():
                t.data.copy_(buf)
    return module


# ----------------------------------------------------------------------------- interference
def _merge_into(acc: dict[str, torch.Tensor], part: InterferenceResult, col_offset: int, topk: int) -> None:
    """Fold one column block's reductions (indices local to the block) into ``acc``."""
    acc["sq"] += part.sq_interference
    acc["sqcos"] += part.sq_cos
    # max |cos|: the larger wins; equal values go to the smaller global index.
    idx = torch.where(part.argmax >= 0, part.argmax + col_offset, part.argmax)
    better = (part.max_abs_cos > acc["maxabs"]) | (
        (part.max_abs_cos == acc["maxabs"]) & (idx >= 0) & ((acc["argmax"] < 0) | (idx < acc["argmax"]))
    )
    acc["maxabs"] = torch.where(better, part.max_abs_cos, acc["maxabs"])
    acc["argmax"] = torch.where(better, idx, acc["argmax"])
    if topk:
        tk_idx = torch.where(part.topk_index >= 0, part.topk_index + col_offset, part.topk_index)
        cos = torch.cat([acc["tk_cos"], part.topk_cos], 1)
        ids = torch.cat([acc["tk_idx"], tk_idx], 1)
        score = torch.where(ids >= 0, cos.abs(), torch.full_like(cos, -1.0))
        # Order by (|cos| descending, index ascending): sort by index, then stably by score.
        big = torch.iinfo(torch.int64).max
        order = torch.sort(torch.where(ids >= 0, ids, big), dim=1, stable=True).indices
        score, cos, ids = score.gather(1, order), cos.gather(1, order), ids.gather(1, order)
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :topk]
        keep = score.gather(1, order) > 0
        acc["tk_cos"] = torch.where(keep, cos.gather(1, order), 0.0)
        acc["tk_idx"] = torch.where(keep, ids.gather(1, order), -1)


def _row_block_interference(
    W_rows: torch.Tensor,
    row_offset: int,
    column_blocks: Iterator[tuple[int, torch.Tensor]],
    topk: int,
    block: int,
    backend: str | None,
) -> InterferenceResult:
    """Reductions of ``W_rows`` (global rows from ``row_offset``) against every column block.

    ``column_blocks`` yields (global offset, rows) of every *other* row of W exactly once;
    the rows' own block is handled here with the diagonal excluded.
    """
    n = W_rows.shape[0]
    own = interference(W_rows, topk=topk, block=block, backend=backend)
    acc = {
        "sq": own.sq_interference.clone(),
        "sqcos": own.sq_cos.clone(),
        "maxabs": own.max_abs_cos.clone(),
        "argmax": torch.where(own.argmax >= 0, own.argmax + row_offset, own.argmax),
        "tk_cos": own.topk_cos.clone(),
        "tk_idx": torch.where(own.topk_index >= 0, own.topk_index + row_offset, own.topk_index),
    }
    for offset, cols in column_blocks:
        if n and cols.shape[0]:
            part = interference(W_rows, cols, topk=topk, block=block, backend=backend)
            _merge_into(acc, part, offset, topk)
    nsq = own.norms.double() ** 2
    dims = torch.where(nsq > 0, nsq / (nsq + acc["sq"]), torch.zeros_like(nsq))
    return InterferenceResult(
        norms=own.norms,
        sq_interference=acc["sq"],
        sq_cos=acc["sqcos"],
        dims=dims,
        max_abs_cos=acc["maxabs"],
        argmax=acc["argmax"],
        topk_cos=acc["tk_cos"],
        topk_index=acc["tk_idx"],
        m=W_rows.shape[1],
    )


def interference_sharded(
    W_local: torch.Tensor,
    topk: int = 0,
    *,
    chunk: int = 4096,
    block: int = 0,
    backend: str | None = None,
    group=None,
) -> InterferenceResult:
    """Interference of a W whose rows are sharded across ranks in rank order.

    W_local: (n_r, m), this rank's rows (rank r owns global rows after ranks 0..r-1's).
    Returns the per-feature reductions of this rank's rows against all n rows, with global
    partner indices, equal to ``interference(W)`` on one device restricted to these rows.
    Every other rank's block reaches this rank in broadcasts of ``chunk`` rows, so memory
    stays O((n_r + chunk) · m). Every rank must call this together (it is a collective).
    """
    import torch.distributed as dist

    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    rank, world = rank_world(group)
    if world == 1:
        return interference(W_local, topk=topk, block=block, backend=backend)
    counts = all_gather_cat(torch.tensor([W_local.shape[0]], dtype=torch.int64, device=W_local.device), group)
    counts = [int(c) for c in counts]
    widths = all_gather_cat(torch.tensor([W_local.shape[1]], dtype=torch.int64, device=W_local.device), group)
    if len(set(int(w) for w in widths)) != 1:
        raise ValueError(f"every rank's W_local must have the same width m, got {[int(w) for w in widths]}")
    offsets = [sum(counts[:r]) for r in range(world)]
    W_local = W_local.contiguous()

    def blocks() -> Iterator[tuple[int, torch.Tensor]]:
        src_group_rank = dist.get_global_rank if group is not None else (lambda _g, r: r)
        for src in range(world):
            for c0 in range(0, counts[src], chunk):
                rows = min(chunk, counts[src] - c0)
                buf = W_local[c0 : c0 + rows].clone() if src == rank else W_local.new_empty(rows, W_local.shape[1])
                dist.broadcast(buf, src=src_group_rank(group, src), group=group)
                if src != rank:
                    yield offsets[src] + c0, buf

    return _row_block_interference(W_local, offsets[rank], blocks(), topk, block, backend)


def interference_split(
    W: torch.Tensor, topk: int = 0, *, block: int = 0, backend: str | None = None, group=None
) -> InterferenceResult:
    """``interference(W)`` with the rows split across ranks (every rank holds all of W).

    Each rank computes its contiguous row block against all of W (no communication), then
    the per-feature results are gathered, so every rank returns the full result.
    """
    rank, world = rank_world(group)
    if world == 1:
        return interference(W, topk=topk, block=block, backend=backend)
    lo, hi = shard_range(W.shape[0], rank, world)
    others = iter([(0, W[:lo]), (hi, W[hi:])])
    part = _row_block_interference(W[lo:hi], lo, others, topk, block, backend)
    return gather_rows(part, group)


def gather_rows(part: InterferenceResult, group=None) -> InterferenceResult:
    """Concatenate every rank's row-block result (in rank order) into the full result."""
    return InterferenceResult(
        norms=all_gather_cat(part.norms, group),
        sq_interference=all_gather_cat(part.sq_interference, group),
        sq_cos=all_gather_cat(part.sq_cos, group),
        dims=all_gather_cat(part.dims, group) if part.dims is not None else None,
        max_abs_cos=all_gather_cat(part.max_abs_cos, group),
        argmax=all_gather_cat(part.argmax, group),
        topk_cos=all_gather_cat(part.topk_cos, group),
        topk_index=all_gather_cat(part.topk_index, group),
        m=part.m,
    )


def agree(ok: bool, device: torch.device | str = "cpu", group=None) -> bool:
    """True on every rank iff ``ok`` on every rank (so one rank's error stops all, no hang)."""
    import torch.distributed as dist

    if rank_world(group)[1] == 1:
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())
