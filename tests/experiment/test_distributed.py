"""all_reduce across 2 CPU ranks (gloo) equals one process over all the tokens."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import supanalysis as sa
from supanalysis.accumulators.sparse_coactivation import SparseCoActivation
from supanalysis.distributed import leave_process_group


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


def _topk(x: torch.Tensor) -> torch.Tensor:
    """Top-3 features per token as codes (NaN sorts first: dropped to padding)."""
    idx = torch.nan_to_num(x, nan=-1e9).topk(3, dim=1).indices
    return torch.where(torch.isfinite(x).all(1, keepdim=True), idx, torch.full_like(idx, -1))


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
        sp = SparseCoActivation(9).update_sparse(_topk(xs)).all_reduce()
        if rank == 0:
            torch.save(
                {
                    "stats": s.state_dict(),
                    "corr": c.state_dict(),
                    "coact": k.state_dict(),
                    "sparse": sp.state_dict(),
                    "ok": int(ok.sum()),
                },
                out,
            )
    finally:
        leave_process_group()


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
    sp = SparseCoActivation(9).update_sparse(_topk(x)).state_dict()
    assert all(torch.equal(got["sparse"][key], sp[key]) for key in sp)


# ----------------------------------------------------------------------------- sharded interference
def _directions():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(37, 6, generator=g, dtype=torch.float64)
    W[5] = 0.0  # a zero row: cosine 0 with everything
    W[20] = -2.0 * W[3] + 1e-3 * W[20]  # a near-antipodal partner in another shard
    return W


def _interference_worker(rank: int, world: int, port: int, out: str) -> None:
    from supanalysis.distributed import interference_sharded, interference_split, shard_range

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        W = _directions()
        lo, hi = shard_range(W.shape[0], rank, world)
        res = {}
        for backend in ("reference", "cpp"):
            part = interference_sharded(W[lo:hi].clone(), topk=3, chunk=4, backend=backend)
            res[backend] = {f: getattr(part, f) for f in _FIELDS}
        split = interference_split(W, topk=3, backend="reference")
        res["split"] = {f: getattr(split, f) for f in _FIELDS}
        gathered = [None] * world
        dist.all_gather_object(gathered, res)  # test harness only: the library never pickles
        if rank == 0:
            torch.save(gathered, out)
    finally:
        leave_process_group()


_FIELDS = ("norms", "sq_interference", "sq_cos", "dims", "max_abs_cos", "argmax", "topk_cos", "topk_index")


def test_sharded_interference_equals_one_device(tmp_path):
    from supanalysis.distributed import shard_range

    out = str(tmp_path / "parts.pt")
    world = 3
    mp.spawn(_interference_worker, args=(world, _free_port(), out), nprocs=world, join=True)
    parts = torch.load(out, weights_only=False)  # written by this test's own workers
    W = _directions()
    for backend, tol in (("reference", 1e-12), ("cpp", 1e-5)):
        one = sa.interference(W if backend == "reference" else W.float(), topk=3, backend=backend)
        for r in range(world):
            lo, hi = shard_range(W.shape[0], r, world)
            got = parts[r][backend]
            for f in _FIELDS:
                want = getattr(one, f)[lo:hi]
                if want.dtype == torch.int64:
                    assert torch.equal(got[f], want), (backend, r, f)
                else:
                    assert torch.allclose(got[f].double(), want.double(), rtol=tol, atol=tol), (backend, r, f)
    split = parts[0]["split"]
    ref = sa.interference(W, topk=3, backend="reference")
    for f in _FIELDS:
        a, b = split[f], getattr(ref, f)
        assert torch.equal(a, b) if b.dtype == torch.int64 else torch.allclose(a, b, rtol=1e-12, atol=1e-12), f


# ----------------------------------------------------------------------------- the whole test, sharded
def _measure_worker(rank: int, world: int, port: int, root: str, out: str, budget: int) -> None:
    from supanalysis.experiment import analyse, measure

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        meas = measure(_pipeline_config(root, budget), progress=False)
        report, _ = analyse(meas)
        if rank == 0:
            state = {f"cross.{k}": v.state_dict() for k, v in meas.cross.items() if hasattr(v, "state_dict")}
            state.update({f"stats.a.{i}": s.stats.state_dict() for i, s in enumerate(meas.a.sites)})
            state["losses"] = meas.a.losses
            with open(out + ".json", "w") as fh:
                json.dump(report, fh)
            torch.save(state, out)
    finally:
        leave_process_group()


def _pipeline_config(root: str, budget: int = 8 << 30):
    from supanalysis.config import ModelSpec, SAETraining, TestConfig

    return TestConfig(
        model_a=ModelSpec(path=f"{root}/A", name="A", dictionary="train"),
        model_b=ModelSpec(path=f"{root}/B", name="B"),
        tokens=f"{root}/tokens.npy",
        seq_len=32,
        batch_size=4,
        eval_tokens=700,
        stats_tokens=2500,  # 79 sequences: the last batch is partial
        match_tokens=1500,  # the matching budget ends inside rank 0's share
        sae=SAETraining(expansion=2, k=4, tokens=2048, batch_size=256),
        bootstrap=50,
        match_max_bytes=budget,
    )


@pytest.mark.parametrize("budget", [8 << 30, 100], ids=["dense", "tiled"])
def test_two_rank_run_test_equals_single_process(tmp_path, budget):
    import numpy as np

    from supanalysis.experiment import analyse, measure
    from supanalysis.models import TinyConfig, TinyTransformer

    root = tmp_path
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, 64, 20_000).astype(np.uint16))
    for name, (L, d) in {"A": (1, 16), "B": (2, 8)}.items():
        torch.manual_seed(L)
        TinyTransformer(TinyConfig(n_layers=L, d_model=d, n_heads=2, d_ff=4 * d, vocab_size=64, n_ctx=32)).save(
            root / name
        )
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_measure_worker, args=(2, _free_port(), str(root), out, budget), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    with open(out + ".json") as fh:
        got_report = json.load(fh)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        meas = measure(_pipeline_config(str(root), budget), progress=False)
    finally:
        torch.set_num_threads(n)
    want_report, _ = analyse(meas)
    assert torch.equal(got["losses"], meas.a.losses)
    for i, s in enumerate(meas.a.sites):
        st, ws = got[f"stats.a.{i}"], s.stats.state_dict()
        for key in ("n_tokens", "finite_count", "fire_count", "l0_hist"):
            assert torch.equal(st[key], ws[key]), key
        for key in ("mean", "m2", "max", "min", "active_sum"):
            assert torch.allclose(st[key], ws[key], rtol=1e-9, atol=1e-9), key
    for k, cc in meas.cross.items() if budget > 100 else ():
        gs, ws = got[f"cross.{k}"], cc.state_dict()
        assert int(gs["n_tokens"]) == int(ws["n_tokens"]) == 1500
        for key in ("mean_a", "m2_a", "mean_b", "m2_b", "comoment"):
            assert torch.allclose(gs[key], ws[key], rtol=1e-9, atol=1e-9), (k, key)
    _assert_close_json(got_report, want_report)


def _assert_close_json(a, b, path="report"):
    """Equal JSON, floats to 1e-9 relative (sums over ranks round differently)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k != "created":
                _assert_close_json(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close_json(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= 1e-9 * max(1.0, abs(b)), (path, a, b)
    else:
        assert a == b, (path, a, b)
