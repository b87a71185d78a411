"""The few terminal lines printed after a test: verdict, premises, each pair, where the report is."""

from __future__ import annotations

import copy
import os

from supanalysis.report import print_summary


def test_summary_lines(report, capsys):
    failed = copy.deepcopy(report)
    failed["premises"][1]["holds"] = False
    failed["pairs"][1]["predicted_ratio"] = None
    failed["pairs"][1]["median_log_ratio"]["value"] = None
    print_summary(failed, "out")
    assert capsys.readouterr().out.splitlines() == [
        "",
        "verdict: contradiction: all 2 site pairs agree: contradiction",
        "  ok  P1 equal parameters: relative difference 1.2% ≤ 5%",
        "  NOT P2 equal performance: within ±3%",
        "  ok  P3 different neuron counts: 64 vs 48; 128 vs 192",
        "  resid_post.0 ~ resid_post.1: matched 0.62 (baseline 0.01), median ln ratio 0.020 [-0.100, 0.150], "
        "π 1.700 -> contradiction",
        "  mlp<hidden>.1 ~ resid_post.3: matched 0.62 (baseline 0.01), median ln ratio —, π — -> contradiction",
        f"report: {os.path.join('out', 'report.html')} (also report.md, report.json)",
    ]
