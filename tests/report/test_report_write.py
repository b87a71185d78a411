"""The report folder: the round trip through report.json and arrays.safetensors, and failed writes."""

from __future__ import annotations

import copy
import errno
import json
import re
import warnings

import numpy as np
import pytest
import torch

from supanalysis import durable
from supanalysis import report as rep
from supanalysis.durable import TEMP_MARK, WriteError

pytest.importorskip("matplotlib")


def test_write_and_load_round_trip(tmp_path, report, arrays, cached_figures):
    bad = copy.deepcopy(report)
    bad["sites"]["A"][0]["fvu"] = float("nan")
    bad["sites"]["A"][1]["C_star"] = float("inf")
    mixed = dict(arrays)
    mixed["density/A/resid_post.0"] = arrays["density/A/resid_post.0"].float().numpy()  # numpy float32
    mixed["extra/int"] = torch.arange(5, dtype=torch.int32)
    mixed["extra/reversed"] = np.arange(4.0)[::-1]  # negative strides
    paths = rep.write_report(tmp_path / "out", bad, mixed)
    assert {p.name for p in paths.values()} == {"report.json", "arrays.safetensors", "report.md", "report.html"}
    assert not [p for p in (tmp_path / "out").iterdir() if TEMP_MARK in p.name]
    text = paths["json"].read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded, loaded_arrays = rep.load_report(tmp_path / "out")
    expected = copy.deepcopy(report)
    expected["sites"]["A"][0]["fvu"] = None
    expected["sites"]["A"][1]["C_star"] = None
    assert loaded == json.loads(json.dumps(expected))
    assert set(loaded_arrays) == set(mixed)
    for k, v in arrays.items():
        if k != "density/A/resid_post.0":
            assert loaded_arrays[k].dtype == torch.float64
            assert torch.equal(loaded_arrays[k], v), k
    assert torch.equal(loaded_arrays["density/A/resid_post.0"], arrays["density/A/resid_post.0"].float().double())
    assert loaded_arrays["extra/int"].dtype == torch.int64
    assert loaded_arrays["extra/reversed"].tolist() == [3.0, 2.0, 1.0, 0.0]
    # The figures were drawn from the stored (float64, contiguous) tensors.
    (given,) = cached_figures
    assert all(t.dtype in (torch.float64, torch.int64) and t.is_contiguous() for t in given.values())
    assert "## Verdict" in paths["markdown"].read_text()
    assert paths["html"].read_text().count("<img") == len(rep.FIGURES)


def test_load_rejects_other_schema(tmp_path, cached_figures):
    rep.write_report(tmp_path, {"schema": "something/else"}, {})
    with pytest.raises(ValueError, match=re.escape(rep.SCHEMA)):
        rep.load_report(tmp_path)
    with pytest.raises(FileNotFoundError):
        rep.load_report(tmp_path / "missing")


def test_degenerate_report_still_renders(tmp_path, report):
    """No pairs, no any-layer entries, sites without densities, and no arrays at all."""
    thin = copy.deepcopy(report)
    thin["pairs"] = []
    thin["any_layer"] = []
    thin["verdict"] = {"outcome": "inconclusive", "reason": "no site pairs were analysed", "numbers": {}}
    for s in thin["sites"]["B"]:
        s.update(p_star=None, pressure=False, median_density=None, C_star=None, g_median=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = rep.write_report(tmp_path, thin, {})
    md = paths["markdown"].read_text()
    assert md.index("Inconclusive") < md.index("## Premises")
    assert "No site pairs were analysed." in md
    assert paths["html"].read_text().count("<img") == len(rep.FIGURES)
    assert rep.load_report(tmp_path)[1] == {}


@pytest.mark.parametrize("failing", ["arrays.safetensors", "report.md", "report.html", "report.json"])
def test_full_disk_leaves_no_report_json(tmp_path, monkeypatch, report, arrays, cached_figures, failing):
    """A full disk on any of the four files: one WriteError naming it, no temp file, no report.json
    (also not the one a previous run left), so the folder never looks complete."""
    folder = tmp_path / "out"
    rep.write_report(folder, report, arrays)
    real_replace = durable.os.replace

    def full_disk(src, dst):
        if str(dst).endswith(failing):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(durable.os, "replace", full_disk)
    with pytest.raises(WriteError, match=re.escape(str(folder / failing))) as info:
        rep.write_report(folder, report, arrays)
    assert "No space left on device" in str(info.value)
    names = {p.name for p in folder.iterdir()}
    assert "report.json" not in names
    assert not [n for n in names if TEMP_MARK in n]
    with pytest.raises(FileNotFoundError):
        rep.load_report(folder)


def test_unwritable_folder_is_one_write_error(tmp_path, monkeypatch, report, arrays, cached_figures):
    """A folder that cannot be created: a WriteError naming report.json, nothing written."""

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(type(tmp_path), "mkdir", denied)
    with pytest.raises(WriteError, match=r"cannot write .*report\.json: Permission denied"):
        rep.write_report(tmp_path / "out", report, arrays)


def test_report_json_carries_a_checksum_and_an_edited_one_is_refused(tmp_path, report, arrays, cached_figures):
    paths = rep.write_report(tmp_path, report, arrays)
    doc = json.loads(paths["json"].read_text())
    assert len(doc["checksum"]) == 64
    loaded, _ = rep.load_report(tmp_path)
    assert "checksum" not in loaded
    rep.write_report(tmp_path / "again", loaded, arrays)  # a loaded report writes back with a fresh checksum
    assert json.loads((tmp_path / "again" / "report.json").read_text())["checksum"] == doc["checksum"]
    edited = copy.deepcopy(doc)
    edited["sites"]["A"][0]["fvu"] = 0.5  # still valid JSON, still the schema: only the checksum knows
    paths["json"].write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=re.escape(str(paths["json"])) + ".*fails its checksum.*'checksum' field"):
        rep.load_report(tmp_path)
    # A report from before reports carried a checksum is the user's own output: it still loads.
    del edited["checksum"]
    paths["json"].write_text(json.dumps(edited))
    assert rep.load_report(tmp_path)[0]["sites"]["A"][0]["fvu"] == 0.5
