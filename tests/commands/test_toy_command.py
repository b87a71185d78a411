"""``supanalysis toy --quick``: the tour end to end through the command line."""

from __future__ import annotations

import json

import pytest

from supanalysis.cli import main
from supanalysis.durable import TEMP_MARK
from supanalysis.toy_tour import QUICK

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_quick_tour_report(tmp_path, capsys):
    # The CLI's quick path end to end: every reproduction passes and the report embeds the figures.
    assert main(["toy", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert QUICK.sweep_steps <= 1000  # --quick must stay a CI smoke run
    data = json.loads((tmp_path / "report.json").read_text())
    for name, rep in data["reproductions"].items():
        assert rep["pass"], (name, rep)
    printed = capsys.readouterr().out
    assert "pentagon: pass" in printed and f"report: {tmp_path / 'report.md'}" in printed
    md = (tmp_path / "report.md").read_text()
    for name in ("d_star", "dims", "pentagon", "linear"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name}.png)" in md
    assert md.count("**pass**") == 3
    assert "| reproduction | expected (Elhage et al.) | measured | result |" in md
    assert "max \\|‖W_i‖−1\\|" in md  # a pipe inside a cell is escaped, so the table keeps its columns
    assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]
    assert data["reproductions"]["sticky_d_star"]["d_star_at_density_1"] == pytest.approx(1.0, abs=0.05)
    # Two pentagon seeds reconstruct the same inputs: feature i's best match is feature i.
    assert data["best_match_a_to_b"]["match"] == [0, 1, 2, 3, 4]
    assert min(data["best_match_a_to_b"]["max_corr"]) > 0.8
