"""Hostile updates and constructor arguments for the accumulators: each is refused with a
clear error and leaves the state exactly as it was."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fuzzing import (
    CLEAR,
    CPU_BACKENDS,
    JSON_VALUES,
    assert_same_state,
    expect_clear,
    fuzz,
    snapshot,
)
from hypothesis import given
from hypothesis import strategies as st

import supanalysis as sa

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


N = 6
GOOD_X = torch.randn(9, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
GOOD_IDX = torch.tensor([[0, 3, -1], [5, 1, 2], [-1, -1, 4]])
GOOD_VAL = torch.rand(3, 3, generator=torch.Generator().manual_seed(1))

BAD_DTYPES = [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8]


@st.composite
def bad_dense(draw, n: int):
    """A value ActivationStats(n).update / CoActivation(n).update must refuse."""
    kind = draw(st.sampled_from(["width", "dtype", "type", "meta", "scalar"]))
    lead = draw(st.lists(st.integers(0, 3), max_size=2))
    if kind == "width":
        m = draw(st.integers(0, 9).filter(lambda m: m != n))
        return torch.randn(*lead, m)
    if kind == "dtype":
        return torch.zeros(*lead, n, dtype=draw(st.sampled_from(BAD_DTYPES)))
    if kind == "type":
        return draw(st.sampled_from([None, 1.5, [[0.0] * n], np.zeros((2, n)), "x"]))
    if kind == "meta":
        return torch.zeros(*lead, n, device="meta")
    return torch.tensor(1.0)


@st.composite
def bad_sparse(draw, n: int):
    """(indices, values) that update_sparse must refuse."""
    T, k = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    idx = torch.full((T, k), -1, dtype=torch.int64)
    val = torch.ones(T, k)
    kind = draw(st.sampled_from(["high", "low", "dup", "idx_dtype", "val_dtype", "rank", "shape", "meta", "type"]))
    r, c = draw(st.integers(0, T - 1)), draw(st.integers(0, k - 1))
    if kind == "high":
        idx[r, c] = draw(st.integers(n, 2**62))
    elif kind == "low":
        idx[r, c] = draw(st.integers(-(2**62), -2))
    elif kind == "dup":
        idx = torch.zeros(T, max(k, 2), dtype=torch.int64)
        val = torch.ones(T, max(k, 2))
    elif kind == "idx_dtype":
        idx = idx.to(draw(st.sampled_from([torch.float32, torch.bool, torch.uint8, torch.int16])))
    elif kind == "val_dtype":
        val = val.to(draw(st.sampled_from(BAD_DTYPES)))
    elif kind == "rank":
        idx, val = idx.reshape(-1), val.reshape(-1)
    elif kind == "shape":
        val = torch.ones(T, k + 1)
    elif kind == "meta":
        idx, val = idx.to("meta"), val.to("meta")
    else:
        idx = idx.tolist()
    return idx, val


def _stats(backend):
    return sa.ActivationStats(N, threshold=0.1, backend=backend).update(GOOD_X).update_sparse(GOOD_IDX, GOOD_VAL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@fuzz(80)
@given(x=bad_dense(N), sparse=bad_sparse(N))
def test_activation_stats_refuses_bad_updates_and_keeps_state(backend, x, sparse):
    s = _stats(backend)
    before = snapshot(s)
    expect_clear(lambda: s.update(x))
    assert_same_state(before, snapshot(s))
    expect_clear(lambda: s.update_sparse(*sparse))
    assert_same_state(before, snapshot(s))
    # Still usable, and equal to an accumulator that never saw the bad inputs.
    s.update(GOOD_X)
    assert_same_state(snapshot(_stats(backend).update(GOOD_X)), snapshot(s))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@fuzz(80)
@given(x=bad_dense(N), sparse=bad_sparse(N))
def test_coactivation_refuses_bad_updates_and_keeps_state(backend, x, sparse):
    co = sa.CoActivation(N, threshold=0.1, backend=backend).update(GOOD_X).update_sparse(GOOD_IDX)
    before = snapshot(co)
    expect_clear(lambda: co.update(x))
    assert_same_state(before, snapshot(co))
    idx, _ = sparse
    # update_sparse takes indices only: some bad (indices, values) pairs have valid indices.
    if not (isinstance(idx, torch.Tensor) and idx.dim() == 2 and idx.dtype == torch.int64 and not idx.is_meta):
        expect_clear(lambda: co.update_sparse(idx))
    elif bool(((idx >= N) | (idx < -1)).any()):
        expect_clear(lambda: co.update_sparse(idx), "indices")
    assert_same_state(before, snapshot(co))
    co.update(GOOD_X)
    ref = sa.CoActivation(N, threshold=0.1, backend=backend).update(GOOD_X).update_sparse(GOOD_IDX).update(GOOD_X)
    assert_same_state(snapshot(ref), snapshot(co))


@st.composite
def bad_pair(draw, n_a: int, n_b: int):
    """(xa, xb) that CrossCorrelation(n_a, n_b).update must refuse."""
    T = draw(st.integers(0, 4))
    xa, xb = torch.randn(T, n_a), torch.randn(T, n_b)
    kind = draw(st.sampled_from(["width_a", "width_b", "tokens", "dtype", "scalar", "meta", "type"]))
    if kind == "width_a":
        xa = torch.randn(T, draw(st.integers(0, 6).filter(lambda m: m != n_a)))
    elif kind == "width_b":
        xb = torch.randn(T, draw(st.integers(0, 6).filter(lambda m: m != n_b)))
    elif kind == "tokens":
        xb = torch.randn(T + draw(st.integers(1, 3)), n_b)
    elif kind == "dtype":
        xa = xa.to(draw(st.sampled_from(BAD_DTYPES)))
    elif kind == "scalar":
        xa, xb = draw(st.sampled_from([(torch.tensor(1.0), xb), (xa, torch.tensor(1.0))]))
    elif kind == "meta":
        xa, xb = draw(st.sampled_from([(xa.to("meta"), xb), (xa, xb.to("meta")), (xa.to("meta"), xb.to("meta"))]))
    else:
        xa = xa.numpy()
    return xa, xb


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@fuzz(80)
@given(pair=bad_pair(4, 3))
def test_cross_correlation_refuses_bad_updates_and_keeps_state(backend, pair):
    g = torch.Generator().manual_seed(2)
    xa, xb = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    cc = sa.CrossCorrelation(4, 3, backend=backend).update(xa, xb)
    before = snapshot(cc)
    expect_clear(lambda: cc.update(*pair))
    assert_same_state(before, snapshot(cc))
    cc.update(xa, xb)
    ref = sa.CrossCorrelation(4, 3, backend=backend).update(xa, xb).update(xa, xb)
    assert_same_state(snapshot(ref), snapshot(cc))


@fuzz(30)
@given(n=JSON_VALUES, threshold=JSON_VALUES, device=st.sampled_from([None, "cpu", "bogus", "cuda:99", 3, "meta"]))
def test_accumulator_constructors_validate_arguments(n, threshold, device):
    """Bad arguments raise a clear error; good small ones construct; a quadratic state over
    max_bytes raises MemoryError (the documented guard)."""
    int_n = isinstance(n, int) and not isinstance(n, bool) and n >= 1
    ok_thr = isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold)
    ok_dev = device in (None, "cpu", "meta") or (device == "cuda:99" and torch.cuda.is_available())
    cases = (
        ("ActivationStats", lambda: sa.ActivationStats(n, threshold, device=device), True, 0),
        ("CoActivation", lambda: sa.CoActivation(n, threshold, device=device, max_bytes=1 << 20), True, n),
        ("CrossCorrelation", lambda: sa.CrossCorrelation(n, 3, device=device, max_bytes=1 << 20), False, 3),
    )
    for name, ctor, uses_threshold, cols in cases:
        ok = int_n and ok_dev and (ok_thr or not uses_threshold)
        over = int_n and cols and n * cols * 8 > 1 << 20  # the guard may speak first
        if not ok:
            with pytest.raises((MemoryError, *CLEAR) if over else CLEAR):
                ctor()
        elif over:
            with pytest.raises((MemoryError, *CLEAR)):
                ctor()
        elif n <= 64:
            acc = ctor()  # valid and small: must construct
            assert acc is not None, name
        else:  # valid but large: constructs or refuses clearly, never anything else
            try:
                ctor()
            except (MemoryError, *CLEAR):
                pass


def test_assert_same_state_catches_a_changed_value():
    """The state comparison must see a changed finite value, not only dtype and NaN pattern."""
    s = snapshot(sa.ActivationStats(N, threshold=0.1).update(GOOD_X))
    assert_same_state(s, {k: v.clone() for k, v in s.items()})
    for key in ("mean", "m2", "fire_count"):
        changed = {k: v.clone() for k, v in s.items()}
        changed[key].view(-1)[0] += 1
        with pytest.raises(AssertionError, match=key):
            assert_same_state(s, changed)
    nan = {k: v.clone() for k, v in s.items()}
    nan["mean"][0] = float("nan")
    with pytest.raises(AssertionError):
        assert_same_state(s, nan)
    assert_same_state(nan, {k: v.clone() for k, v in nan.items()})  # NaN equals NaN
