"""Backend selection: explicit choices, the environment variable, auto fallback, errors."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pytest
import torch

import supanalysis as sa
from supanalysis import _backend
from supanalysis.ops import activation_stats as stats_op

STATS = (stats_op.DENSE.backends, stats_op.DENSE.preferred)  # (implemented, preferred) for resolve


def test_cpp_extension_loaded_when_required():
    # CI sets SUPANALYSIS_REQUIRE_CPP=1: a silent fallback to the reference must fail it.
    if os.environ.get("SUPANALYSIS_REQUIRE_CPP") == "1":
        assert _backend.native() is not None, _backend.native_error()
        assert sa.backends()["cpp"].available
    ext = _backend.native()
    if ext is not None:
        assert hasattr(ext, "activation_stats_cpu")
        assert ext.with_openmp


_SMALL_TEAM = """
import torch
from supanalysis.ops.activation_stats import activation_stats_cpu
from supanalysis.ops.best_match import best_match_cpu, best_match_reference
torch.set_num_threads(2)
assert activation_stats_cpu(torch.randn(512, 4), 0.0)[0].tolist() == [512] * 4
C, ones = torch.randn(8, 5, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
got, want = best_match_cpu(C, ones, ones[:5]), best_match_reference(C, ones, ones[:5])
assert all(torch.equal(g, w) for g, w in zip(got, want)), (got, want)
"""


@pytest.mark.skipif(_backend.native() is None, reason="needs the C++ extension")
def test_cpp_kernels_split_work_over_the_team_they_get():
    """OpenMP may run a parallel region with fewer threads than asked for (here a thread limit
    of 1 under 2 requested): the dense stats and best_match kernels split their work over the
    threads that exist, so nothing is skipped (they once counted half the tokens)."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    out = subprocess.run([sys.executable, "-c", _SMALL_TEAM], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_backends_reports_every_backend():
    st = sa.backends()
    assert set(st) == set(sa.BACKENDS)
    assert st["reference"].available
    for s in st.values():
        assert s.reason
        assert s.available == bool(s.devices)


def test_explicit_backend_wins_over_env(monkeypatch):
    monkeypatch.setenv("SUPANALYSIS_BACKEND", "cpp")
    x = torch.randn(10, 3)
    assert _backend.resolve("activation_stats", x.device, "reference", *STATS) == "reference"


def test_env_backend_used(monkeypatch):
    monkeypatch.setenv("SUPANALYSIS_BACKEND", "reference")
    assert _backend.resolve("activation_stats", torch.device("cpu"), None, *STATS) == "reference"


def test_unknown_backend_name_raises(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        sa.activation_stats(torch.randn(3, 2), backend="fast")
    monkeypatch.setenv("SUPANALYSIS_BACKEND", "turbo")
    with pytest.raises(ValueError, match="backend must be one of"):
        sa.activation_stats(torch.randn(3, 2))


def test_explicit_unavailable_backend_raises():
    # The CUDA backend never runs on CPU tensors.
    with pytest.raises(sa.BackendUnavailable, match="cuda"):
        sa.activation_stats(torch.randn(4, 3), backend="cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    if not _backend._triton_version():
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(sa.BackendUnavailable, match="triton"):
        _backend.resolve("activation_stats", torch.device("cpu"), "triton", *STATS)


def test_auto_falls_back_and_logs_once(monkeypatch, caplog):
    # Pretend the op prefers a backend that cannot run here: auto must fall back and say so once.
    prefs = {"cpu": ("cuda",)}
    _backend._warned.clear()
    with caplog.at_level(logging.WARNING, logger="supanalysis"):
        a = _backend.resolve("fake_op", torch.device("cpu"), "auto", ("reference", "cuda"), prefs)
        b = _backend.resolve("fake_op", torch.device("cpu"), "auto", ("reference", "cuda"), prefs)
    assert a == b == "reference"
    msgs = [r.getMessage() for r in caplog.records if "fake_op" in r.getMessage()]
    assert len(msgs) == 1 and "reference" in msgs[0]


def test_auto_prefers_cpp_on_cpu():
    if not sa.backends()["cpp"].available:
        pytest.skip("C++ extension not built")
    assert _backend.resolve("activation_stats", torch.device("cpu"), "auto", *STATS) == "cpp"


def test_info_cli_prints_backends(capsys):
    from supanalysis.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "cpp" in out and "reference" in out


def test_no_top_level_kernels_package_from_the_source_tree():
    """The Triton kernels are supanalysis.kernels. A ``kernels`` package at a clone's root would
    be importable whenever Python runs there (python -m pytest, python -m bench) and would
    shadow the PyPI project ``kernels``, which transformers imports: importing transformers'
    models then fails."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.find_spec("kernels")
    assert spec is None or Path(spec.origin or "").resolve() != root / "kernels" / "__init__.py", spec
    assert importlib.util.find_spec("supanalysis.kernels") is not None
