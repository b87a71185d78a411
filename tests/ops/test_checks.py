"""Input checks at the op boundary: every backend refuses what no kernel may be driven with,
before any kernel runs, with an error that names the argument."""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import pytest
import torch
from conftest import BACKEND_DEVICES

import supanalysis as sa
from supanalysis import _backend, dispatch
from supanalysis.ops import coactivation as CO
from supanalysis.ops import sparse_outer as SO
from supanalysis.ops.registry import REGISTRY, Example, OpEntry, entries

CPU_BACKENDS = [b for b, d in BACKEND_DEVICES if d == "cpu"]
TRITON_CPU = "triton" in CPU_BACKENDS


def _refusing(entry: OpEntry, monkeypatch) -> None:
    """Replace every launcher of ``entry`` by one that fails the test if it is reached."""

    def reached(*args, **kwargs):
        raise AssertionError(f"a {entry.name} kernel ran on inputs the boundary should refuse")

    for backend in entry.backends:
        monkeypatch.setitem(entry.implementations, backend, reached)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [5, 6, 2**40, -2])
def test_coactivation_sparse_refuses_out_of_range_indices(backend, bad):
    counts = torch.zeros(5, 5, dtype=torch.int64)
    idx = torch.tensor([[0, 1], [2, bad]])
    with pytest.raises(ValueError, match=r"indices must be in \[-1, 5\)"):
        CO.coactivation_update_sparse(counts, idx, backend=backend)
    assert not counts.any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("side,bad", [("ia", 4), ("ia", 2**40), ("ib", 3), ("ib", -7)])
def test_sparse_outer_refuses_out_of_range_indices(backend, side, bad):
    out = torch.zeros(4, 3, dtype=torch.float64)
    ia, ib = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0], [2]])
    (ia if side == "ia" else ib)[1, 0] = bad
    v = torch.ones(2, 2), torch.ones(2, 1)
    with pytest.raises(ValueError, match=side):
        SO.sparse_outer_update(out, ia, v[0], ib, v[1], backend=backend)
    assert not out.any()


@pytest.mark.parametrize("name", ["sparse_outer_update", "coactivation_update_sparse"])
def test_bad_indices_never_reach_a_kernel(name, monkeypatch):
    entry = entries()[name]
    args = list(entry.example(dataclasses.replace(_EX, bad_index=_EX.n)))
    _refusing(entry, monkeypatch)
    for backend in CPU_BACKENDS:
        with pytest.raises(ValueError, match="must be in"):
            entry.op(*_with_backend(entry, args, backend))  # the torch.ops call is checked too


_EX = Example(T=4, n=6, k=2)


def _with_backend(entry: OpEntry, args: list, backend: str) -> tuple:
    args = list(args)
    args.insert(entry.arg_names.index("backend"), backend)
    return tuple(args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_thresholds_are_refused(backend):
    x = torch.randn(6, 3)
    for thr in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="threshold must be finite"):
            sa.activation_stats(x, threshold=thr, backend=backend)
        with pytest.raises(ValueError, match="threshold must be finite"):
            sa.activation_stats_sparse(torch.zeros(6, 1, dtype=torch.int64), torch.ones(6, 1), 3, thr, backend=backend)
        with pytest.raises(ValueError, match="threshold must be finite"):
            CO.coactivation_update(torch.zeros(3, 3, dtype=torch.int64), x, thr, backend=backend)
    with pytest.raises(ValueError, match="threshold must be finite"):
        torch.ops.supanalysis.activation_stats(x, float("nan"), backend)


def test_topk_is_clamped_to_the_partners_a_row_has():
    W = torch.randn(5, 3)
    r = sa.interference(W, topk=10**9)
    assert r.topk_cos.shape == (5, 4) and r.topk_index.shape == (5, 4)
    assert sa.interference(W, torch.randn(2, 3), topk=10**9).topk_index.shape == (5, 2)
    assert sa.interference(W[:1], topk=3).topk_index.shape == (1, 0)
    ref = sa.interference(W, topk=4)
    assert torch.equal(r.topk_index, ref.topk_index)
    with pytest.raises(ValueError, match="topk must be in"):
        torch.ops.supanalysis.interference(W, None, 10**9, 0, "", "ieee")


@pytest.mark.skipif(not TRITON_CPU, reason="needs Triton under TRITON_INTERPRET=1 on the CPU")
def test_triton_interpreter_refuses_bf16_instead_of_garbage():
    W = torch.randn(9, 4).bfloat16()
    with pytest.raises(TypeError, match=r"triton backend does not support torch\.bfloat16"):
        sa.interference(W, backend="triton")
    r = sa.interference(W.half(), backend="triton")  # float16 is computed correctly
    ref = sa.interference(W.half(), backend="reference")
    assert torch.allclose(r.max_abs_cos, ref.max_abs_cos, atol=1e-3)


def test_each_backend_declares_its_dtypes():
    for entry in entries().values():
        assert set(entry.dtypes) <= set(entry.backends), entry.name
        assert all(entry.supported_dtypes(b) for b in entry.backends if b != "triton"), entry.name
        assert entry.supported_dtypes("no such backend") == ()
    with pytest.raises(TypeError, match=r"cpp backend does not support torch\.float32"):
        sa.ops.best_match.best_match(torch.zeros(2, 2), torch.ones(2), torch.ones(2), backend="cpp")


# ----------------------------------------------------------------------------- registry


def test_backend_status_is_cached_until_the_environment_changes(monkeypatch):
    calls = []
    real = _backend.backend_status
    monkeypatch.setattr(_backend, "backend_status", lambda: calls.append(1) or real())
    _backend._status_cache.clear()
    x = torch.randn(4, 3)
    for _ in range(3):
        sa.activation_stats(x, backend="reference")
    assert len(calls) == 1
    monkeypatch.setenv("SUPANALYSIS_BACKEND", "reference")
    sa.activation_stats(x)
    assert len(calls) == 2
    _backend._status_cache.clear()


@pytest.fixture
def variants(monkeypatch):
    """A cuda_variants module with one variant of activation_stats."""

    def fast(x, threshold):
        return REGISTRY["activation_stats"].implementations["reference"](x, threshold)

    mod = types.ModuleType("supanalysis.ops.cuda_variants")
    mod.VARIANTS = {"activation_stats": {"fast": fast}}
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return fast


def test_variants_are_reachable_by_name_and_listed(variants):
    entry = REGISTRY["activation_stats"]
    assert entry.implementation("cuda", variant="fast") is variants
    assert "activation_stats:fast" in sa.ops.registry.variant_names()["cuda"]
    assert "activation_stats:fast" in _backend.backends()["cuda"].variants
    with pytest.raises(ValueError, match="no cuda variant 'slow'"):
        entry.implementation("cuda", variant="slow")


def test_a_missing_variants_module_means_no_variants(monkeypatch):
    monkeypatch.setitem(sys.modules, "supanalysis.ops.cuda_variants", None)  # import fails
    assert sa.ops.registry.cuda_variants() == {}
    assert "cuda" not in sa.ops.registry.variant_names()


def test_auto_takes_a_variant_only_where_the_dispatch_table_names_it(tmp_path, monkeypatch):
    entry = REGISTRY["activation_stats"]

    def fast(x, threshold):
        return entry.implementations["cpp"](x, threshold)

    e = dataclasses.replace(entry, variants={"cpp": {"fast": fast}})
    cpu = torch.device("cpu")
    assert e.select(cpu, None, torch.float32)[1] is entry.implementations["cpp"]
    table = {"op": "activation_stats", "device": "cpu", "dtype": "float32", "backend": "cpp", "variant": "fast"}
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"schema": 1, "choices": [table]}))
    monkeypatch.setenv(dispatch.ENV, str(path))
    assert e.select(cpu, None, torch.float32) == ("cpp", fast)
    assert e.select(cpu, "cpp", torch.float32)[1] is entry.implementations["cpp"]  # explicit: no variant
    assert e.select(cpu, None, torch.float64)[1] is entry.implementations["cpp"]
