"""Shared helpers of the hostile-input (fuzz) tests: bounded hypothesis settings, the
"fails clearly" checks, a memory cap, state snapshots and hostile JSON values and files.

Property tests use hypothesis with a fixed, database-less, derandomized profile, so CI sees
the same examples every run and each fuzz file stays well under a minute.
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import torch
from conftest import FAST_BACKEND_DEVICES
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
#: What a rejected input may raise. JSON/TOML/Unicode decode errors are ValueError subclasses
#: but their messages never name the file, so they count as unclear (see expect_clear).
CLEAR = (ValueError, TypeError, FileNotFoundError)
UNCLEAR_SUBCLASSES = (json.JSONDecodeError, UnicodeDecodeError)
CPU_BACKENDS = [b for b, d in FAST_BACKEND_DEVICES if d == "cpu"]


def fuzz(n: int):
    """Bounded, deterministic hypothesis settings (no example database, no deadline)."""
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def expect_clear(fn, *names: object) -> BaseException:
    """Call fn; it must raise one of CLEAR (not a bare decode error) whose message names each of names."""
    try:
        fn()
    except CLEAR as exc:
        assert not isinstance(exc, UNCLEAR_SUBCLASSES), f"bare {type(exc).__name__}: {exc}"
        for name in names:
            assert str(name) in str(exc), f"{type(exc).__name__} message does not name {name}: {exc}"
        return exc
    raise AssertionError(f"{fn} accepted a hostile input")


def call_ok_or_clear(fn, *names: object):
    """fn() either succeeds (returning its value) or fails clearly; returns (ok, value_or_exc)."""
    try:
        return True, fn()
    except CLEAR as exc:
        assert not isinstance(exc, UNCLEAR_SUBCLASSES), f"bare {type(exc).__name__}: {exc}"
        for name in names:
            assert str(name) in str(exc), f"{type(exc).__name__} message does not name {name}: {exc}"
        return False, exc


@contextlib.contextmanager
def bounded_memory(extra: int = 2 << 30):
    """Cap this process's address space at its current size + ``extra`` (Linux), so a loader
    that regresses into allocating what a corrupt file claims fails with an allocation error
    instead of drawing the OOM killer onto a shared CI machine."""
    try:
        import resource

        vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
        old = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, StopIteration):
        yield
        return
    limit = vm + extra if old[1] == resource.RLIM_INFINITY else min(vm + extra, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


def snapshot(acc) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in acc.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, devices, dtypes, shapes and values; NaN equals NaN (a state may hold NaN
    where a statistic is undefined)."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].device == b[k].device and a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=lambda m, k=k: f"{k}: {m}")


# JSON values of every kind, including the ones that have bitten loaders: bools (an int
# subclass), huge ints, NaN/Inf, strings of digits, nested containers.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, -1, 1, 2, 3, 4, 8, 16, 2**31, 2**63, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
    | st.sampled_from(["4", "8", "true", "none", "topk", "relu", "jumprelu", "standard"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


# ------------------------------------------------------------------ malformed safetensors


def _header_file(header: object, data: bytes = b"\0" * 8, length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


MALFORMED = {
    "empty": b"",
    "short": b"\x01\x02\x03",
    "length-beyond-file": _header_file({}, length=1 << 20),
    "length-2^64-1": _header_file({}, length=2**64 - 1),
    "length-zero": _header_file(b"", length=0),
    "header-not-json": _header_file(b"{this is not json"),
    "header-not-utf8": _header_file(b"\xff\xfe\xfd"),
    "header-a-list": _header_file([1, 2, 3]),
    "dtype-unknown": _header_file({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 8]}}),
    "shape-vs-data": _header_file({"a": {"dtype": "F64", "shape": [1000], "data_offsets": [0, 8]}}),
    "dtype-vs-data": _header_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}),
    "offsets-beyond-file": _header_file({"a": {"dtype": "F64", "shape": [1], "data_offsets": [8, 16]}}),
    "offsets-reversed": _header_file({"a": {"dtype": "F64", "shape": [1], "data_offsets": [8, 0]}}),
    "shape-negative": _header_file({"a": {"dtype": "F64", "shape": [-1], "data_offsets": [0, 8]}}),
    "shape-overflow": _header_file({"a": {"dtype": "F64", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}),
    "metadata-not-str": _header_file({"__metadata__": {"supanalysis": 3}, "a": {"dtype": "F64", "shape": [1],
                                                                                 "data_offsets": [0, 8]}}),
}  # fmt: skip


def _malformed_bytes():
    return st.one_of(
        st.sampled_from(sorted(MALFORMED)).map(MALFORMED.get),
        st.binary(max_size=64),
        # A plausible length prefix in front of random bytes.
        st.tuples(st.integers(0, 80), st.binary(max_size=80)).map(lambda t: struct.pack("<Q", t[0]) + t[1]),
    )


def _write(base: Path, name: str, data: bytes) -> Path:
    path = base / name
    path.write_bytes(data)
    return path
