"""Truncated, bit-flipped, mislabelled and malformed accumulator files: each is refused
with an error naming the file, or loads a state that is consistent and usable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fuzzing import (
    JSON_VALUES,
    _malformed_bytes,
    _write,
    bounded_memory,
    call_ok_or_clear,
    expect_clear,
    fuzz,
)
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

import supanalysis as sa
from supanalysis.accumulators._state import FORMAT_VERSION

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _accumulators():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    x[3, 2] = float("nan")
    stats = sa.ActivationStats(5, threshold=0.2).update(x)
    cc = sa.CrossCorrelation(5, 3).update(x, torch.randn(40, 3, generator=g))
    co = sa.CoActivation(5, threshold=0.2).update(x)
    return {"ActivationStats": stats, "CrossCorrelation": cc, "CoActivation": co}


ACCS = _accumulators()
KINDS = sorted(ACCS)
CLASSES = {"ActivationStats": sa.ActivationStats, "CrossCorrelation": sa.CrossCorrelation,
           "CoActivation": sa.CoActivation}  # fmt: skip
META = {
    "ActivationStats": {"n_features": 5, "threshold": 0.2},
    "CrossCorrelation": {"n_a": 5, "n_b": 3},
    "CoActivation": {"n": 5, "threshold": 0.2},
}


def _saved(base: Path, kind: str) -> bytes:
    path = base / f"good-{kind}.safetensors"
    if not path.exists():
        ACCS[kind].save(path)
    return path.read_bytes()


def _write_state(base: Path, kind: str, tensors, meta) -> Path:
    path = base / f"state-{kind}.safetensors"
    md = None if meta is None else {"supanalysis": meta if isinstance(meta, str) else json.dumps(meta)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=md)
    return path


def _use(acc) -> None:
    """Touch every result of a loaded accumulator: a state that loads must be usable."""
    if isinstance(acc, sa.ActivationStats):
        acc.density, acc.var, acc.mean_active, acc.log10_density_hist(), acc.mean_l0
    elif isinstance(acc, sa.CrossCorrelation):
        acc.best_match(), acc.correlation()
    else:
        acc.top_partners(2, "jaccard"), acc.scores("lift")


@fuzz(40)
@given(kind=st.sampled_from(KINDS), cut=st.floats(0, 1, exclude_max=True))
def test_truncated_accumulator_file_is_refused(base, kind, cut):
    raw = _saved(base, kind)
    path = _write(base, "truncated.safetensors", raw[: int(cut * len(raw))])
    expect_clear(lambda: CLASSES[kind].load(path), path)


@fuzz(150)
@given(kind=st.sampled_from(KINDS), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_bit_flipped_accumulator_file_is_refused_or_loads_a_usable_state(base, kind, where, bit):
    raw = bytearray(_saved(base, kind))
    raw[int(where * len(raw))] ^= 1 << bit
    path = _write(base, "flipped.safetensors", bytes(raw))
    ok, got = call_ok_or_clear(lambda: CLASSES[kind].load(path), path)
    if ok:  # a flip in a float payload cannot be told from data without a checksum
        _use(got)


@pytest.mark.parametrize("kind", KINDS)
def test_bit_flip_in_float_payload_is_detected(base, kind):
    raw = bytearray(_saved(base, kind))
    # The last byte of the file is the top byte of a float64/int64 state value.
    raw[-1] ^= 0x10
    path = _write(base, "payload-flip.safetensors", bytes(raw))
    with pytest.raises(ValueError):
        CLASSES[kind].load(path)


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_kind_and_version_are_refused(base, kind):
    _saved(base, kind)
    for other in KINDS:
        if other != kind:
            expect_clear(lambda o=other: CLASSES[o].load(base / f"good-{kind}.safetensors"), "holds a")
    state = ACCS[kind].state_dict()
    for version in ("0", "2", 1, None, FORMAT_VERSION + "x"):
        path = _write_state(base, kind, state, {"kind": kind, "version": version, **META[kind]})
        expect_clear(lambda p=path: CLASSES[kind].load(p), "version")
    expect_clear(lambda: CLASSES[kind].load(_write_state(base, kind, state, None)), "metadata")
    expect_clear(lambda: CLASSES[kind].load(_write_state(base, kind, state, "{not json")), "metadata")
    expect_clear(lambda: CLASSES[kind].load(base / "no-such-file"), "no-such-file")
    expect_clear(lambda: CLASSES[kind].load(base), base)


@pytest.mark.parametrize("meta", ["[1, 2]", '"ActivationStats"', "3", "null"])
def test_metadata_that_is_not_an_object_is_refused(base, meta):
    path = _write_state(base, "ActivationStats", ACCS["ActivationStats"].state_dict(), meta)
    expect_clear(lambda: sa.ActivationStats.load(path), path)


@fuzz(100)
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_fuzzed_metadata_fields_are_refused_without_allocating(base, kind, data):
    meta = {"kind": kind, "version": FORMAT_VERSION, **META[kind]}
    field = data.draw(st.sampled_from(sorted(META[kind])))
    if data.draw(st.booleans()):
        del meta[field]
    else:
        meta[field] = data.draw(JSON_VALUES)
    path = _write_state(base, kind, ACCS[kind].state_dict(), meta)
    with bounded_memory():
        ok, got = call_ok_or_clear(lambda: CLASSES[kind].load(path), path)
    if ok:  # only a value equal to the truth (or a threshold, which the state cannot check) loads
        if field == "threshold":
            assert got.threshold == float(meta[field])
        else:
            assert meta[field] == META[kind][field] and type(meta[field]) is int


@fuzz(100)
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_fuzzed_state_tensors_are_refused(base, kind, data):
    state = dict(ACCS[kind].state_dict())
    key = data.draw(st.sampled_from(sorted(state)))
    how = data.draw(st.sampled_from(["drop", "extra", "dtype", "shape", "negative", "nan"]))
    t = state[key]
    if how == "drop":
        del state[key]
    elif how == "extra":
        state["extra"] = torch.zeros(2)
    elif how == "dtype":
        state[key] = t.to(data.draw(st.sampled_from([torch.float32, torch.int32, torch.float64, torch.int64])))
        if state[key].dtype == t.dtype:
            state[key] = t.to(torch.float16)
    elif how == "shape":
        state[key] = torch.zeros(*[s + 1 for s in t.shape], 1, dtype=t.dtype)
    elif how == "negative":
        if t.is_floating_point() and key not in ("m2", "m2_a", "m2_b"):
            return  # means and sums may legitimately be negative
        state[key] = t - t.abs().max() - 1
    else:
        if not t.is_floating_point() or key not in ("m2", "m2_a", "m2_b", "max", "min"):
            return
        state[key] = torch.full_like(t, float("nan"))
    path = _write_state(base, kind, state, {"kind": kind, "version": FORMAT_VERSION, **META[kind]})
    expect_clear(lambda: CLASSES[kind].load(path), path)
    expect_clear(lambda: CLASSES[kind](*[v for v in META[kind].values()]).load_state_dict(state))


def test_inconsistent_states_are_refused():
    s = ACCS["ActivationStats"].state_dict()
    for key, bad in [
        ("fire_count", s["finite_count"] + 1),
        ("finite_count", s["finite_count"] + int(s["n_tokens"])),
        ("l0_hist", s["l0_hist"] * 2),
        ("max", s["min"] - 1),
        ("n_tokens", torch.tensor(-1)),
    ]:
        with pytest.raises(ValueError, match="inconsistent"):
            sa.ActivationStats(5, 0.2).load_state_dict({**s, key: bad})
    c = ACCS["CoActivation"].state_dict()
    asym = c["counts"].clone()
    asym[0, 1] += 1
    for bad in (asym, -c["counts"], c["counts"] + 1000):
        with pytest.raises(ValueError, match="inconsistent"):
            sa.CoActivation(5, 0.2).load_state_dict({**c, "counts": bad})


@fuzz(100)
@given(data=_malformed_bytes(), kind=st.sampled_from(KINDS))
def test_malformed_safetensors_accumulators(base, data, kind):
    path = _write(base, "malformed.safetensors", data)
    expect_clear(lambda: CLASSES[kind].load(path), path)
