"""The measured dispatch table: auto follows it where it can, and bench writes it."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from bench.report import Row
from bench.runner import dispatch_choices
from supanalysis import dispatch
from supanalysis._backend import BackendUnavailable, resolve
from supanalysis.ops import activation_stats as AS

CPU = torch.device("cpu")


def write_table(path, choices):
    path.write_text(json.dumps({"schema": 1, "choices": choices}))
    return path


def pick(dtype, backend=None):
    return resolve("activation_stats", CPU, backend, AS.DENSE.backends, AS.DENSE.preferred, dtype)


def test_shipped_table_is_valid():
    raw = json.loads(dispatch.SHIPPED.read_text())
    dispatch._parse(raw, str(dispatch.SHIPPED))  # raises on a malformed shipped file


def test_auto_follows_a_measured_choice_for_that_dtype_only(tmp_path, monkeypatch):
    t = write_table(
        tmp_path / "d.json",
        [{"op": "activation_stats", "device": "cpu", "dtype": "float32", "backend": "reference"}],
    )
    monkeypatch.setenv(dispatch.ENV, str(t))
    assert pick(torch.float32) == "reference"
    assert pick(torch.float64) == "cpp"  # no measurement: the static preference
    assert pick(torch.float32, backend="cpp") == "cpp"  # an explicit backend wins
    assert resolve("interference", CPU, None, ("reference", "cpp"), {"cpu": ("cpp",)}, torch.float32) == "cpp"


def test_a_choice_that_cannot_run_here_falls_back(tmp_path, monkeypatch):
    t = write_table(
        tmp_path / "d.json",
        [{"op": "activation_stats", "device": "cpu", "dtype": "float32", "backend": "cuda"}],
    )
    monkeypatch.setenv(dispatch.ENV, str(t))
    assert pick(torch.float32) == "cpp"
    with pytest.raises(BackendUnavailable):
        pick(torch.float32, backend="cuda")


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"schema": 2, "choices": []}), "not a supanalysis dispatch table"),
        (json.dumps({"schema": 1, "choices": [{"op": "x"}]}), "choice 0 is malformed"),
        (
            json.dumps({"schema": 1, "choices": [{"op": "x", "device": "cpu", "dtype": "f", "backend": "gpu"}]}),
            "unknown backend",
        ),
    ],
)
def test_malformed_tables_are_refused_by_name(tmp_path, monkeypatch, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    monkeypatch.setenv(dispatch.ENV, str(p))
    with pytest.raises(ValueError, match=match):
        pick(torch.float32)


def test_missing_table_named_by_env_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.ENV, str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="SUPANALYSIS_DISPATCH"):
        pick(torch.float32)


def row(op, backend, seconds, dtype="bfloat16"):
    return Row(op, "T=1 n=2", dtype, backend, "B", 1.0, seconds)


def test_bench_choices_and_merged_write(tmp_path):
    rows = [
        row("stats", "user", 9.0),  # baselines never compete
        row("stats", "triton", 2.0),
        row("stats", "cuda", 3.0),
        row("cross", "cuda", 1.0),  # one backend timed: no choice to record
        row("interference", "triton", 5.0, "float32"),
        row("interference", "cuda", 4.0, "float32"),
        row("interference", "triton tf32", 1.0, "float32"),  # opt-in variants are not auto's
    ]
    got = dispatch_choices(rows, CPU, "test run")
    assert [(c.op, c.dtype, c.backend) for c in got] == [
        ("activation_stats", "bfloat16", "triton"),
        ("interference", "float32", "cuda"),
    ]
    assert got[0].seconds == {"triton": 2.0, "cuda": 3.0} and got[0].device == "cpu"
    path = tmp_path / "dispatch.json"
    dispatch.write(path, got)
    newer = dispatch.Choice("activation_stats", "cpu", "bfloat16", "cuda", {"triton": 2.5, "cuda": 2.0})
    merged = dispatch.write(path, [newer])
    assert [(c.op, c.backend) for c in merged] == [("activation_stats", "cuda"), ("interference", "cuda")]
    assert json.loads(path.read_text())["schema"] == 1


def test_a_registered_variant_can_win_and_is_recorded_by_name(tmp_path, monkeypatch):
    mod = types.ModuleType("supanalysis.ops.cuda_variants")
    mod.VARIANTS = {"activation_stats": {"fast": lambda x, threshold: None}}
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    rows = [row("stats", "cuda", 3.0), row("stats", "cuda fast", 1.0), row("stats", "cuda slow", 0.5)]
    (got,) = dispatch_choices(rows, CPU, "test run")
    assert (got.backend, got.variant) == ("cuda", "fast")  # "cuda slow" is no registered variant
    assert got.seconds == {"cuda": 3.0, "cuda fast": 1.0}
    path = dispatch.write(tmp_path / "d.json", [got]) and tmp_path / "d.json"
    monkeypatch.setenv(dispatch.ENV, str(path))
    assert dispatch.measured_variant("activation_stats", CPU, torch.bfloat16) == "fast"
    assert dispatch.measured_variant("activation_stats", CPU, torch.float32) == ""
