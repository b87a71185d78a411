"""The named CUDA variants (supanalysis/ops/cuda_variants.py) against float64 references.

GPU tests (``gpu``) run every variant on the cases the default CUDA launchers are tested
on and hold it to the same tolerances; they skip without a CUDA device. The CPU tests
check that the module imports anywhere, that its table names registered ops and real
bound functions of a CUDA build, and that a variant without one fails clearly.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from conftest import assert_argmax_up_to_ties, assert_tolerance_rule

from supanalysis._backend import native
from supanalysis.ops import cuda_variants
from supanalysis.ops.activation_stats import activation_stats_reference
from supanalysis.ops.cross_moments import cross_moments_update_reference
from supanalysis.ops.interference import interference_cuda, interference_reference
from supanalysis.ops.registry import entries

VARIANTS = cuda_variants.VARIANTS
_C = native()
CUDA_BUILD = _C is not None and bool(getattr(_C, "with_cuda", False))
HAS_GPU = CUDA_BUILD and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA build of supanalysis._C and a GPU")
STATS = sorted(VARIANTS.get("activation_stats", {}))
CROSS = sorted(VARIANTS.get("cross_moments_update", {}))
INTERF = sorted(VARIANTS.get("interference", {}))
STATS_FIELDS = ("finite_count", "fire_count", "mean", "m2", "max", "min", "active_sum", "l0")


# ----------------------------------------------------------------------------- CPU side
def test_table_names_registered_ops_with_the_default_signature():
    ops = entries()
    assert VARIANTS and set(VARIANTS) == set(cuda_variants.NATIVE_NAMES)
    for op, named in VARIANTS.items():
        assert op in ops, f"{op} is not a registered op"
        assert named and set(named) == set(cuda_variants.NATIVE_NAMES[op]), op
        default = ops[op].implementation("cuda")
        for name, fn in named.items():
            assert fn.__doc__ and len(fn.__doc__.split()) > 20, f"{op}:{name} needs a docstring"
            try:
                want = list(inspect.signature(default).parameters)
            except (TypeError, ValueError):
                continue
            if want != ["args", "kwargs"]:  # a lazy native launcher has no Python signature
                assert list(inspect.signature(fn).parameters) == want, f"{op}:{name}"


@pytest.mark.skipif(not CUDA_BUILD, reason="supanalysis._C was built without CUDA")
def test_every_variant_is_bound_in_the_cuda_build():
    for op, named in cuda_variants.NATIVE_NAMES.items():
        for variant, bound in named.items():
            assert callable(getattr(_C, bound, None)), f"{op}:{variant}: _C has no {bound}"


@pytest.mark.skipif(CUDA_BUILD, reason="the extension has CUDA")
def test_without_cuda_a_variant_names_what_is_missing():
    x = torch.zeros(2, 3)
    for name, fn in VARIANTS["activation_stats"].items():
        with pytest.raises(RuntimeError, match=cuda_variants.NATIVE_NAMES["activation_stats"][name]):
            fn(x, 0.0)


def test_check_cuda_build_reads_the_same_table():
    """scripts/check_cuda_build.sh reads NATIVE_NAMES as a literal: it must stay one."""
    src = Path(cuda_variants.__file__).read_text()
    node = next(
        n for n in ast.parse(src).body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "NATIVE_NAMES"
    )
    assert ast.literal_eval(node.value) == cuda_variants.NATIVE_NAMES


# ----------------------------------------------------------------------------- activation_stats (GPU)
def _stats_cases() -> dict[str, tuple[torch.Tensor, float, dict[str, float]]]:
    """name -> (x, threshold, atol scale per moment), the default CUDA kernel's test cases."""
    cases = {}
    for T, n in ((1, 97), (67, 1), (300, 97), (300, 1025)):
        g = torch.Generator().manual_seed(T * 7919 + n)
        x = torch.randn(T, n, generator=g) * 3 + 1
        if T > 2:
            x[1, 0], x[2, -1] = float("nan"), float("-inf")
        cases[f"random-{T}x{n}"] = (x, 0.5, {"mean": 4.0, "m2": 16.0 * T, "active_sum": 8.0 * T})
    for n in (1024, 1000, 1001):
        for dtype in (torch.float32, torch.float16):
            g = torch.Generator().manual_seed(n)
            x = torch.randn(600, n, generator=g) * 0.5 + 1000
            x[:, ::7] -= 1000
            x[100, 5], x[64, 9], x[131, -1], x[599, 3] = float("nan"), float("inf"), float("-inf"), float("inf")
            cases[f"nonfinite-{n}-{dtype}"] = (x.to(dtype), 0.05, {"mean": 1e3, "m2": 600.0, "active_sum": 600e3})
    for lead in (32, 45):
        g = torch.Generator().manual_seed(lead)
        x = (1e4 + torch.randn(1000, 20, generator=g, dtype=torch.float64)).float()
        x[:lead] = float("nan")
        cases[f"leading-nan-{lead}"] = (x, 0.0, {"mean": 1e4, "m2": 1000.0, "active_sum": 1e7})
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        x = torch.randn(257, 130, generator=torch.Generator().manual_seed(3)).to(dtype)
        rel = 1e-12 if dtype == torch.float64 else 1e-6
        scale = {"mean": 1.0, "m2": 257.0, "active_sum": 257.0}
        cases[f"dtype-{dtype}"] = (x, 0.0, {k: v * rel / 1e-6 for k, v in scale.items()})
    x = torch.zeros(256, 1)
    x[128:] = 2e18 * (1 + 1e-3 * torch.randn(128, 1, generator=torch.Generator().manual_seed(0)))
    cases["large-values"] = (x, 0.5, {"mean": 2e18, "m2": 0.0, "active_sum": 1e21})  # m2: relative
    return cases


STATS_CASES = _stats_cases()


def _same_dtype_stats(x: torch.Tensor, thr: float) -> dict[str, torch.Tensor]:
    fin = torch.isfinite(x)
    zero = torch.zeros((), dtype=x.dtype)
    mean = torch.where(fin, x, zero).sum(0) / fin.sum(0).clamp_min(1).to(x.dtype)
    d = torch.where(fin, x - mean, zero)
    return {"mean": mean, "m2": (d * d).sum(0), "active_sum": torch.where(fin & (x > thr), x, zero).sum(0)}


def _check_stats(got: list[torch.Tensor], x: torch.Tensor, thr: float, scale: dict[str, float], what: str) -> None:
    ref = activation_stats_reference(x.double(), thr)
    same = _same_dtype_stats(x, thr)
    for name, g, r in zip(STATS_FIELDS, got, ref):
        if name in ("finite_count", "fire_count", "l0", "max", "min"):
            assert torch.equal(g.cpu().to(r.dtype), r), f"{what} {name}"
        elif name == "m2" and scale["m2"] == 0:  # held relative: values at 2e18, M2 ~ 1e34
            assert torch.isfinite(g).all() and (g.cpu() - r).abs().max() <= 1e-6 * r.abs().max(), what
        else:
            assert_tolerance_rule(g, r, same[name], atol=1e-6 * scale[name], what=f"{what} {name}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", sorted(STATS_CASES))
@pytest.mark.parametrize("variant", STATS)
def test_stats_variant_against_reference(variant, case):
    x, thr, scale = STATS_CASES[case]
    got = VARIANTS["activation_stats"][variant](x.cuda(), thr)
    _check_stats(got, x, thr, scale, f"{variant} {case}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant", STATS)
def test_stats_variant_strided_empty_and_constant(variant):
    fn = VARIANTS["activation_stats"][variant]
    wide = torch.randn(300, 77, generator=torch.Generator().manual_seed(4))
    x = wide.cuda()[:, 5:66]  # strided rows, an unaligned start: the scalar-load kernels
    scale = {"mean": 4.0, "m2": 4800.0, "active_sum": 1200.0}
    _check_stats(fn(x, 0.1), wide[:, 5:66].contiguous(), 0.1, scale, "strided")
    for T in (75, 77, 91, 200):
        assert fn(torch.full((T, 8), 0.3, device="cuda"), 0.0)[3].cpu().tolist() == [0.0] * 8, T
    empty = fn(torch.zeros(0, 5, device="cuda"), 0.0)
    assert empty[0].tolist() == [0] * 5 and empty[7].numel() == 0


# ----------------------------------------------------------------------------- cross_moments_update (GPU)
def _bf16_case(seed: int, dtype: torch.dtype, T: int, na: int, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(T, na, generator=g, dtype=torch.float64) * 2 + 5
    xb = torch.randn(T, nb, generator=g, dtype=torch.float64) - 3
    xb[:, 7] = 0.9 * xa[:, 20] + 0.1 * xb[:, 7]
    return xa.to(dtype), xb.to(dtype)


BF16_CASES = {
    "fp32": (torch.float32, 700, 37, 19),
    "fp16": (torch.float16, 700, 37, 19),
    "fp32-tiles": (torch.float32, 4500, 150, 70),  # several tiles, T past one float32 run
}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", sorted(BF16_CASES))
@pytest.mark.parametrize("variant", CROSS)
def test_cross_variant_bf16_multiplies_the_rounded_values(variant, case):
    dtype, T, na, nb = BF16_CASES[case]
    xa, xb = _bf16_case(11, dtype, T, na, nb)
    z = lambda n, d="cpu": torch.zeros(n, dtype=torch.float64, device=d)  # noqa: E731
    want = torch.zeros(na, nb, dtype=torch.float64)
    cross_moments_update_reference(want, 0, z(na), z(nb), xa, xb, "bf16")
    a, b = xa.double(), xb.double()
    scale = (a - a.mean(0)).abs().T @ (b - b.mean(0)).abs()
    C = torch.zeros(na, nb, dtype=torch.float64, device="cuda")
    VARIANTS["cross_moments_update"][variant](C, 0, z(na, "cuda"), z(nb, "cuda"), xa.cuda(), xb.cuda(), "bf16")
    err = ((C.cpu() - want).abs() / scale).max().item()
    assert err < 2e-6, err


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("precision", ["ieee", "bf16"])
@pytest.mark.parametrize("variant", CROSS)
def test_cross_variant_streams_like_the_reference(variant, precision):
    g = torch.Generator().manual_seed(2)
    xa = (torch.randn(300, 97, generator=g) * 3 + 40).float()
    xb = torch.randn(300, 33, generator=g).float()
    xb[:, 3] = 7.0
    want = torch.zeros(97, 33, dtype=torch.float64)
    C = want.cuda()
    ma, mb = torch.zeros(97, dtype=torch.float64), torch.zeros(33, dtype=torch.float64)
    n_prev = 0
    for pa, pb in zip(xa.split(128), xb.split(128)):
        ref = cross_moments_update_reference(want, n_prev, ma, mb, pa, pb, precision)
        fn = VARIANTS["cross_moments_update"][variant]
        got = fn(C, n_prev, ma.cuda(), mb.cuda(), pa.cuda(), pb.cuda(), precision)
        for i, (gv, rv) in enumerate(zip(got, ref)):
            torch.testing.assert_close(gv.cpu(), rv, rtol=1e-6, atol=1e-6 * (40 if i == 0 else 1), msg=f"moment {i}")
        T = len(pa)
        ma = ma + (ref[0] - ma) * (T / (n_prev + T))
        mb = mb + (ref[2] - mb) * (T / (n_prev + T))
        n_prev += T
    scale = (xa.double() - xa.double().mean(0)).abs().T @ (xb.double() - xb.double().mean(0)).abs()
    assert ((C.cpu() - want).abs() / scale).max().item() < 2e-6


# ----------------------------------------------------------------------------- interference (GPU)
def _check_interference(r: list[torch.Tensor], W: torch.Tensor, V: torch.Tensor | None, topk: int, tol: float) -> None:
    ref = interference_reference(W.double(), None if V is None else V.double(), r[6].shape[1], 0)
    torch.testing.assert_close(r[0].cpu(), ref[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(r[1].cpu(), ref[1], rtol=max(tol, 1e-3 if W.abs().max() > 1e20 else tol), atol=tol)
    torch.testing.assert_close(r[2].cpu(), ref[2], rtol=tol, atol=tol)
    if V is None:
        torch.testing.assert_close(r[3].cpu(), ref[3], rtol=tol, atol=tol)
        assert_argmax_up_to_ties(r[5], W, tol=max(tol, 1e-6))
    torch.testing.assert_close(r[4].cpu(), ref[4], rtol=0, atol=tol)
    if topk:
        torch.testing.assert_close(r[6].cpu().abs().sort(1).values, ref[6].abs().sort(1).values, atol=tol, rtol=0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("n,m,block", [(1, 5, 0), (37, 19, 16), (300, 33, 64), (1000, 24, 0)])
@pytest.mark.parametrize("variant", INTERF)
def test_interference_variant_symmetric_and_row_sweeps(variant, n, m, block, dtype):
    g = torch.Generator().manual_seed(n)
    W = torch.randn(n, m, generator=g).to(dtype)
    if n > 8:
        W[3] = 0
        W[8] = W[5]
    fn = VARIANTS["interference"][variant]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for symmetric in (True, False):
        got = fn(W.cuda(), None, 0, block, symmetric=symmetric)
        _check_interference(got, W, None, 0, tol if dtype != torch.bfloat16 else 1e-4)
        default = interference_cuda(W.cuda(), None, 0, block, symmetric=symmetric)
        for i in (0, 1, 2, 3, 4):
            torch.testing.assert_close(got[i].cpu(), default[i].cpu(), rtol=tol, atol=tol)
        if n > 8:
            assert got[5][5].item() == 8 and got[5][8].item() == 5 and got[5][3].item() == -1


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("v_dtype", [None, "same", torch.float32], ids=["noV", "sameV", "fp32V"])
@pytest.mark.parametrize("topk", [0, 3, 40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("variant", INTERF)
def test_interference_variant_16bit_paths(variant, dtype, topk, v_dtype):
    g = torch.Generator().manual_seed(topk * 7 + (v_dtype is None))
    W = torch.randn(70, 24, generator=g, dtype=torch.float64)
    W[5] = 0
    W[8] = W[3] * 0.5
    if dtype == torch.bfloat16:
        W[10] *= 1e30
        W[11] *= 1e-30
    W = W.to(dtype)
    V = None
    if v_dtype is not None:
        V = torch.randn(33, 24, generator=g, dtype=torch.float64)
        V[2] = W[7].double() * -4
        V = V.to(dtype if v_dtype == "same" else v_dtype)
    k = min(topk, 69 if V is None else 33)
    r = VARIANTS["interference"][variant](W.cuda(), None if V is None else V.cuda(), k, 16)
    _check_interference(r, W, V, k, 1e-5)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant", INTERF)
def test_interference_variant_huge_and_tiny_float32_rows(variant):
    W = torch.randn(40, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    W[3] *= 1e30
    W[4] *= 1e-30
    W = W.float()
    r = VARIANTS["interference"][variant](W.cuda(), None, 0, 0)
    ref = interference_reference(W.double(), None, 0, 0)
    torch.testing.assert_close(r[1].cpu(), ref[1], rtol=1e-3, atol=0)
    torch.testing.assert_close(r[2].cpu(), ref[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r[4].cpu(), ref[4], rtol=0, atol=1e-5)
