"""Every registered op on every available backend, driven with random shapes (empty, 1,
odd, 97), dtypes, index ranges and special values (NaN, inf, huge): the result equals the
float64 reference within the tolerance rule, or the call is refused as clearly as the
reference refuses it. Parametrised from the registry: a new op is fuzzed by registering it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import BACKEND_DEVICES, assert_tolerance_rule, interpreting
from fuzzing import CLEAR, fuzz
from hypothesis import given
from hypothesis import strategies as st

from supanalysis.ops.registry import FLOAT_DTYPES, INDEX_DTYPES, Example, OpEntry, entries

ENTRIES = entries()
CASES = [
    (name, backend, device)
    for name, entry in sorted(ENTRIES.items())
    for backend, device in BACKEND_DEVICES
    if backend in entry.backends and backend != "reference"
]
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def clone(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def call(entry: OpEntry, args: tuple, backend: str) -> tuple[list[torch.Tensor] | None, BaseException | None]:
    """(every tensor the op produced or was given, after the call) or the clear error it raised.
    The reference's values come from its launcher itself, outside the op's dispatch path."""
    given = clone(args)
    full = list(given)
    full.insert(entry.arg_names.index("backend"), backend)
    try:
        out = entry.op(*full)
    except CLEAR as exc:
        return None, exc
    if backend == "reference":
        given = clone(args)
        out = entry.implementation("reference")(*given)
    produced = [t for t in (out or []) if isinstance(t, torch.Tensor)]
    return [t.cpu() for t in produced + [a for a in given if isinstance(a, torch.Tensor)]], None


def tolerance(ref: torch.Tensor, dtype: torch.dtype, terms: int) -> tuple[torch.Tensor, float]:
    """(the same-dtype result, atol) of the tolerance rule. A kernel widens 16/32-bit inputs
    to float32, so the same-dtype PyTorch result carries at least the rounding of ``ref`` to
    float32; the atol covers float32 accumulation over ``terms`` summands at ref's scale."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    same = ref.to(compute).double()
    fin = ref[torch.isfinite(ref)]
    scale = max(1.0, float(fin.abs().max())) if fin.numel() else 1.0
    return same, 4 * torch.finfo(compute).eps * (terms + 1) * scale


@st.composite
def examples(draw, entry: OpEntry, backend: str, device: str) -> Example:
    sizes = st.sampled_from([0, 1, 2, 5, 33, 97])
    index_op = INDEX_DTYPES[0] in entry.supported_dtypes("reference")
    dtypes = INDEX_DTYPES if index_op else FLOAT_DTYPES
    special = draw(st.sampled_from(["", "", "nan", "inf", "huge"]))
    bad = draw(st.sampled_from([None, None, "n", -2, 2**40]))
    T, n = draw(sizes), draw(sizes.filter(lambda v: v > 0))
    if interpreting(backend, device):  # the interpreter is slow: keep one size large
        T, n = (T, min(n, 33)) if T < 33 else (T, min(n, 5))
    return Example(
        T=T,
        n=n,
        k=draw(st.sampled_from([1, 3, 8])),
        dtype=draw(st.sampled_from(dtypes)),
        device=device,
        seed=draw(st.integers(0, 2**16)),
        special="" if index_op else special,
        bad_index=n if bad == "n" else bad,
    )


def check_same(got: list[torch.Tensor], want: list[torch.Tensor], e: Example, what: str) -> None:
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what} output {i}: {g.shape} {g.dtype} vs {w.shape}"
        if w.is_floating_point():
            assert torch.equal(g.isnan(), w.isnan()), f"{what} output {i}: NaN pattern differs"
            # NaN == NaN where the pattern agrees; infinities stay (the rule compares them exactly).
            g, w = (t.double().nan_to_num(0.0, posinf=torch.inf, neginf=-torch.inf) for t in (g, w))
            same, atol = tolerance(w, e.dtype, e.T + e.n)
            assert_tolerance_rule(g, w, same, atol=atol, what=f"{what} output {i}")
        else:
            assert torch.equal(g, w), f"{what} output {i} differs"


@pytest.mark.parametrize("name,backend,device", CASES, ids=[f"{n}-{b}-{d}" for n, b, d in CASES])
@fuzz(25)
@given(data=st.data())
def test_op_matches_the_reference_or_refuses_clearly(name, backend, device, data):
    entry = ENTRIES[name]
    e = data.draw(examples(entry, backend, device))
    args = entry.example(e)
    want, ref_err = call(entry, tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args), "reference")
    got, err = call(entry, args, backend)
    what = f"{name}[{backend}] {e}"
    dtype = args[entry.arg_names.index(entry.dispatch_arg)].dtype  # what the op dispatches on
    if dtype not in entry.supported_dtypes(backend) and ref_err is None:
        assert isinstance(err, TypeError) and backend in str(err), f"{what}: unsupported dtype not refused"
        return
    if ref_err is not None:  # refused for the same input, perhaps first for another of its faults
        assert err is not None, f"{what}: accepted what the reference refuses ({ref_err})"
        return
    assert err is None, f"{what}: refused what the reference accepts: {err}"
    if e.special and e.special not in entry.special_values:
        return  # outside the op's contract (module docstring): no result to compare
    check_same(got, want, dataclasses.replace(e, dtype=dtype), what)


def test_every_registered_op_is_fuzzed():
    fuzzed = {n for n, _, _ in CASES}
    assert fuzzed == {n for n, e in ENTRIES.items() if len(e.available_backends("cpu")) > 1}


def test_examples_cover_the_op_arguments():
    for entry in ENTRIES.values():
        args = entry.example(dataclasses.replace(Example(), T=0))
        assert len(args) == len(entry.arg_names) - 1, entry.name
