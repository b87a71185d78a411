"""all_reduce across 2 CPU ranks (gloo) equals one process over all the tokens."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import supanalysis as sa


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(301, 9, generator=g, dtype=torch.float64) * 3 + 50
    y = torch.randn(301, 4, generator=g, dtype=torch.float64) + x[:, :4]
    x[10, 2] = float("nan")
    return x, y


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = _data()
        xs, ys = x[rank::world], y[rank::world]  # each rank its own slice of the tokens
        s = sa.ActivationStats(9, threshold=50.0).update(xs).all_reduce()
        ok = torch.isfinite(xs).all(1)
        c = sa.CrossCorrelation(9, 4).update(xs, ys).all_reduce()
        k = sa.CoActivation(9, threshold=50.0).update(xs).all_reduce()
        if rank == 0:
            torch.save(
                {"stats": s.state_dict(), "corr": c.state_dict(), "coact": k.state_dict(), "ok": int(ok.sum())}, out
            )
    finally:
        dist.destroy_process_group()


def test_two_rank_all_reduce_equals_single_process(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    x, y = _data()
    s = sa.ActivationStats(9, threshold=50.0).update(x).state_dict()
    for key in ("n_tokens", "finite_count", "fire_count", "max", "min", "l0_hist"):
        assert torch.equal(got["stats"][key], s[key]), key
    for key in ("mean", "m2", "active_sum"):
        assert torch.allclose(got["stats"][key], s[key], rtol=1e-12, atol=1e-9), key
    c = sa.CrossCorrelation(9, 4).update(x, y).state_dict()
    assert int(got["corr"]["n_tokens"]) == int(c["n_tokens"]) and int(got["corr"]["n_skipped"]) == 1
    for key in ("mean_a", "m2_a", "mean_b", "m2_b", "comoment"):
        assert torch.allclose(got["corr"][key], c[key], rtol=1e-10, atol=1e-8), key
    k = sa.CoActivation(9, threshold=50.0).update(x).state_dict()
    assert torch.equal(got["coact"]["counts"], k["counts"])
