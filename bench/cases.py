"""What is timed: each op's backends on named shapes, its eager baselines, its useful work.

Every op builds its inputs once and returns one zero-argument callable per row:
  reference, cpp, triton, cuda  the op's backend functions, called directly (the public
                                wrappers add argument checks and dispatch on top)
  user                          the eager PyTorch a user would write for the same result
  bare ...                      (some ops) the one primitive the op cannot beat, e.g. W @ W.T
Mutating ops (cross, coact, coact_sparse) accumulate into the same state on every repeat:
their cost does not depend on the state's values, so no reset is needed or timed.
Work units: "B" (bytes the op must read and write at least), "FLOP" (useful FLOPs,
2·m·n·k per product), "incr" (pair increments, T·k·k for top-k coactivation).
A baseline that is linear in the token count and too large to run whole is a
:class:`Chunked` call: one chunk of the tokens is timed and the time multiplied by the
number of chunks (what a user would run, chunk after chunk); its row says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from supanalysis.ops import activation_stats as AS
from supanalysis.ops.registry import entries

Dims = dict[str, int]
Calls = dict[str, Callable[[], object]]
F64 = 8  # bytes


def launchers(op: str) -> dict[str, Callable]:
    """The registered op's launchers by backend (ops/registry.py)."""
    return dict(entries()[op].implementations)


def backend_calls(op: str, *args) -> Calls:
    """One call per backend of the registered op, and one per named variant ("cuda <name>"),
    all on the same arguments."""
    entry = entries()[op]
    calls: Calls = {b: partial(f, *args) for b, f in entry.implementations.items()}
    for backend, named in entry.all_variants().items():
        calls.update({f"{backend} {v}": partial(f, *args) for v, f in named.items()})
    return calls


@dataclass(frozen=True)
class Op:
    """One benchmark case of the registered op ``op`` (its entry lists the case in bench_cases)."""

    name: str
    op: str
    unit: str  # "B", "FLOP" or "incr"
    work: Callable[[Dims, int], float]  # (dims, element size) -> work per call
    mem: Callable[[Dims, int], dict[str, float]]  # baseline -> rough peak temporary bytes
    build: Callable[[Dims, torch.dtype, torch.device], Calls]
    scale: tuple[str, int]  # baseline cost ~ dims[name] ** power (to estimate from a probe)
    shapes: dict[str, Dims]  # "cpu", "cuda", "quick"
    dtype: torch.dtype | None = None  # fixed dtype (ignores --dtype), else None

    @property
    def implemented(self) -> tuple[str, ...]:
        return entries()[self.op].backends


@dataclass(frozen=True)
class Chunked:
    """One chunk of a token-linear baseline; the full call costs ``chunks`` times as much."""

    call: Callable[[], object]
    chunks: int

    def __call__(self) -> object:
        return self.call()


def label(dims: Dims) -> str:
    return " ".join(f"{k}={v:,}" for k, v in dims.items())


def topk_indices(T: int, k: int, n: int, device: torch.device) -> torch.Tensor:
    """[T, k] int64, k distinct features per row in random order (no dense [T, n] draw)."""
    draw = torch.randint(0, n - k + 1, (T, k), device=device).sort(1).values
    distinct = draw + torch.arange(k, device=device)  # strictly increasing, < n
    order = torch.rand(T, k, device=device).argsort(1)
    return distinct.gather(1, order)


# ----------------------------------------------------------------------------- stats
def stats_user(x: torch.Tensor) -> tuple:
    fire = x > 0
    return fire.sum(0), x.sum(0), x.mean(0), x.var(0), x.amax(0), x.amin(0), fire.sum(1)


def build_stats(d: Dims, dtype, device) -> Calls:
    x = torch.randn(d["T"], d["n"], device=device).to(dtype)
    calls = backend_calls("activation_stats", x, 0.0)
    calls["user"] = partial(stats_user, x)
    # One read of the same tensor, timed right beside the backends (after the eager
    # baseline, as they are): the target's ratio, without the drift between this case and
    # the run's limit row.
    calls["bare x.sum()"] = x.sum
    return calls


def build_stats_sparse(d: Dims, dtype, device) -> Calls:
    T, k, n = d["T"], d["k"], d["n"]
    idx = topk_indices(T, k, n, device)
    val = (torch.rand(T, k, device=device) + 0.1).to(dtype)
    calls = backend_calls("activation_stats_sparse", idx, val, n, 0.0)
    # Densify-then-update, the way a user with a dense kernel would: chunks of ~256 MiB
    # of dense codes, each through the fused dense update (auto backend).
    rows = _chunk_rows(T, n * torch.empty(0, dtype=dtype).element_size())

    def densify_then_update():
        x = torch.zeros(rows, n, dtype=dtype, device=device).scatter_(1, idx[:rows], val[:rows])
        return AS.activation_stats(x, 0.0)

    calls["user"] = Chunked(densify_then_update, -(-T // rows))
    return calls


def _chunk_rows(T: int, row_bytes: int, chunk_bytes: int = 256 << 20) -> int:
    return max(1, min(T, chunk_bytes // max(1, row_bytes)))


# ----------------------------------------------------------------------------- interference
def interference_user(W: torch.Tensor) -> tuple:
    Wn = W / W.norm(dim=1, keepdim=True)
    G = Wn @ Wn.T
    G.fill_diagonal_(0)
    return G.square().sum(1), G.abs().max(1)


def build_interference(d: Dims, dtype, device) -> Calls:
    W = torch.randn(d["n"], d["m"], device=device).to(dtype)
    k = d.get("k", 0)
    impl = launchers("interference")
    calls = backend_calls("interference", W, None, k, 0)
    if device.type == "cuda" and dtype == torch.float32:  # the opt-in TF32 dot (+ exact rescoring)
        calls["triton tf32"] = partial(impl["triton"], W, None, k, 0, "tf32")
    if device.type == "cuda" and not k:  # symmetric tiles (the default here) against row sweeps
        calls["triton rows"] = partial(impl["triton"], W, None, k, 0, "ieee", False)
        if dtype in (torch.float16, torch.bfloat16):  # the default 128-wide tiles against 64
            calls["triton 64"] = partial(impl["triton"], W, None, k, 64)
        calls["cuda rows"] = partial(impl["cuda"], W, None, k, 0, "ieee", False)
    if k:  # the cost of top-k: the same op without it is the bare row
        best = "cuda" if device.type == "cuda" else "cpp"
        calls[f"bare k=0 ({best})"] = partial(impl[best], W, None, 0, 0)
        return calls
    calls["user"] = partial(interference_user, W)
    calls["bare W@W.T"] = lambda: W @ W.T
    return calls


# ----------------------------------------------------------------------------- correlation
def build_cross(d: Dims, dtype, device) -> Calls:
    T, na, nb = d["T"], d["n_a"], d["n_b"]
    xa = torch.randn(T, na, device=device).to(dtype)
    xb = torch.randn(T, nb, device=device).to(dtype)
    C = torch.zeros(na, nb, dtype=torch.float64, device=device)
    ma = torch.zeros(na, dtype=torch.float64, device=device)
    mb = torch.zeros(nb, dtype=torch.float64, device=device)
    impl = launchers("cross_moments_update")
    calls = backend_calls("cross_moments_update", C, T, ma, mb, xa, xb)

    def user():
        a, b = xa.double(), xb.double()
        C.addmm_((a - a.mean(0)).T, b - b.mean(0))

    if device.type == "cuda" and dtype != torch.float64:  # opt-in precision "bf16" (tensor cores)
        calls["triton bf16"] = partial(impl["triton"], C, T, ma, mb, xa, xb, "bf16")
        calls["cuda bf16"] = partial(impl["cuda"], C, T, ma, mb, xa, xb, "bf16")
    calls["user"] = user
    calls["bare xa.T@xb"] = lambda: xa.T @ xb
    return calls


def build_best_match(d: Dims, dtype, device) -> Calls:
    na, nb = d["n_a"], d["n_b"]
    C = torch.randn(na, nb, dtype=torch.float64, device=device) * 0.3
    ia = torch.rand(na, dtype=torch.float64, device=device) + 0.5
    ib = torch.rand(nb, dtype=torch.float64, device=device) + 0.5
    calls = backend_calls("best_match", C, ia, ib)

    def user():
        corr = C * ia[:, None] * ib[None, :]
        return corr.max(1), corr.max(0)

    calls["user"] = user
    calls["bare C.sum()"] = C.sum
    return calls


# ----------------------------------------------------------------------------- coactivation
def build_coact(d: Dims, dtype, device) -> Calls:
    x = torch.randn(d["T"], d["n"], device=device).to(dtype)
    counts = torch.zeros(d["n"], d["n"], dtype=torch.int64, device=device)
    calls = backend_calls("coactivation_update", counts, x, 0.0)

    def user():
        B = (x > 0).float()
        counts.add_((B.T @ B).long())

    calls["user"] = user
    return calls


def build_coact_sparse(d: Dims, dtype, device) -> Calls:
    T, k, n = d["T"], d["k"], d["n"]
    idx = topk_indices(T, k, n, device)
    counts = torch.zeros(n, n, dtype=torch.int64, device=device)
    calls = backend_calls("coactivation_update_sparse", counts, idx)

    # Densify, then the dense binarised B.T @ B, chunk by chunk of tokens (linear in T);
    # 64 MiB chunks keep one chunk's GEMM within the time budget on a small CPU.
    rows = _chunk_rows(T, 4 * n, 64 << 20)
    chunk = idx[:rows]

    def dense_binarised():
        B = torch.zeros(rows, n, device=device).scatter_(1, chunk, 1.0)
        counts.add_((B.T @ B).long())

    calls["bare B.T@B"] = Chunked(dense_binarised, -(-T // rows))
    return calls


# ----------------------------------------------------------------------------- the table
OPS: dict[str, Op] = {  # each case's op lists the case in its registry entry's bench_cases
    op.name: op
    for op in (
        Op(
            "stats",
            "activation_stats",
            "B",
            work=lambda d, e: d["T"] * d["n"] * e + d["T"] * F64 + 7 * d["n"] * F64,
            mem=lambda d, e: {"reference": 48 * d["T"] * d["n"], "user": 6 * d["T"] * d["n"]},
            build=build_stats,
            scale=("T", 1),
            shapes={
                "cpu": {"T": 65536, "n": 4096},
                "cuda": {"T": 16384, "n": 131072},
                "quick": {"T": 2048, "n": 256},
            },
        ),
        Op(
            "stats_sparse",
            "activation_stats_sparse",
            "B",
            work=lambda d, e: d["T"] * d["k"] * (F64 + e) + d["T"] * F64 + 7 * d["n"] * F64,
            mem=lambda d, e: {"reference": 56 * d["T"] * d["n"], "user": 2 * (256 << 20)},
            build=build_stats_sparse,
            scale=("T", 1),
            shapes={
                "cpu": {"T": 65536, "k": 64, "n": 65536},
                "cuda": {"T": 262144, "k": 64, "n": 131072},
                "quick": {"T": 2048, "k": 16, "n": 1024},
            },
        ),
        Op(
            "interference",
            "interference",
            "FLOP",
            work=lambda d, e: 2 * d["n"] ** 2 * d["m"],
            mem=lambda d, e: {
                "reference": 3 * F64 * d["n"] * d["m"] + 6 * F64 * 1024 * d["n"],
                "user": 2 * e * d["n"] ** 2 + e * d["n"] * d["m"],
                "bare W@W.T": e * d["n"] ** 2,
            },
            build=build_interference,
            scale=("n", 2),
            shapes={
                "cpu": {"n": 16384, "m": 512},
                "cuda": {"n": 65536, "m": 4096},
                "quick": {"n": 512, "m": 64},
            },
        ),
        Op(
            "interference_topk",
            "interference",
            "FLOP",
            work=lambda d, e: 2 * d["n"] ** 2 * d["m"],
            mem=lambda d, e: {"reference": 3 * F64 * d["n"] * d["m"] + 6 * F64 * 1024 * d["n"]},
            build=build_interference,
            scale=("n", 2),
            shapes={
                "cpu": {"n": 16384, "m": 512, "k": 32},
                "cuda": {"n": 65536, "m": 4096, "k": 32},
                "quick": {"n": 512, "m": 64, "k": 8},
            },
        ),
        Op(
            "cross",
            "cross_moments_update",
            "FLOP",
            work=lambda d, e: 2 * d["T"] * d["n_a"] * d["n_b"],
            mem=lambda d, e: {
                "reference": 2 * F64 * d["T"] * (d["n_a"] + d["n_b"]) + 2 * F64 * d["n_a"] * d["n_b"],
                "user": 2 * F64 * d["T"] * (d["n_a"] + d["n_b"]),
                "bare xa.T@xb": e * d["n_a"] * d["n_b"],
            },
            build=build_cross,
            scale=("T", 1),
            shapes={
                "cpu": {"T": 8192, "n_a": 4096, "n_b": 4096},
                "cuda": {"T": 65536, "n_a": 32768, "n_b": 32768},
                "quick": {"T": 512, "n_a": 256, "n_b": 256},
            },
        ),
        Op(
            "best_match",
            "best_match",
            "B",
            work=lambda d, e: F64 * d["n_a"] * d["n_b"] + 3 * F64 * (d["n_a"] + d["n_b"]),
            mem=lambda d, e: {
                "reference": 4 * F64 * d["n_a"] * d["n_b"],
                "user": F64 * d["n_a"] * d["n_b"],
            },
            build=build_best_match,
            scale=("n_a", 1),
            shapes={
                "cpu": {"n_a": 4096, "n_b": 4096},
                "cuda": {"n_a": 32768, "n_b": 32768},
                "quick": {"n_a": 256, "n_b": 256},
            },
            dtype=torch.float64,
        ),
        Op(
            "coact",
            "coactivation_update",
            "FLOP",
            work=lambda d, e: 2 * d["T"] * d["n"] ** 2,
            mem=lambda d, e: {
                "reference": 9 * d["T"] * d["n"] + 3 * F64 * d["n"] ** 2,
                "user": 5 * d["T"] * d["n"] + 2 * F64 * d["n"] ** 2,
            },
            build=build_coact,
            scale=("T", 1),
            shapes={
                "cpu": {"T": 8192, "n": 4096},
                "cuda": {"T": 65536, "n": 16384},
                "quick": {"T": 512, "n": 256},
            },
        ),
        Op(
            "coact_sparse",
            "coactivation_update_sparse",
            "incr",
            work=lambda d, e: d["T"] * d["k"] ** 2,
            mem=lambda d, e: {
                "reference": F64 * d["T"] * d["n"] + 3 * F64 * d["n"] ** 2,
                "bare B.T@B": (256 << 20) + 3 * F64 * d["n"] ** 2,
            },
            build=build_coact_sparse,
            scale=("T", 1),
            shapes={
                "cpu": {"T": 65536, "k": 64, "n": 16384},
                "cuda": {"T": 262144, "k": 64, "n": 16384},
                "quick": {"T": 2048, "k": 16, "n": 512},
            },
            dtype=torch.int64,
        ),
    )
}
