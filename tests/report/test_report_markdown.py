"""The report as Markdown: verdict first, every section and field, nulls as dashes."""

from __future__ import annotations

import copy
import math

from sample_report import SECTIONS

from supanalysis import report as rep


def test_markdown_verdict_first_and_every_section(report):
    md = rep.render_markdown(report)
    positions = [md.index(s) for s in SECTIONS]
    assert positions == sorted(positions), "sections out of order"
    verdict = md[md.index("## Verdict") : md.index("## Premises")]
    assert "`contradiction`" in verdict and "Contradiction:" in verdict
    assert "all 2 site pairs agree" in verdict
    assert "tally.contradiction" in verdict
    # The decision table carries the numbers the rules compare (matched fraction, CI, ln π).
    assert "0.62" in verdict and "[-0.1, 0.15]" in verdict and f"{math.log(1.7):.4g}" in verdict
    assert "| yes | no | contradiction |" in verdict  # 0 in the CI, ln π not
    # Every field of every object appears as a header or a row label.
    every = (rep.MODEL_FIELDS, rep.PER_MODEL_FIELDS, rep.SITE_SPARSITY_FIELDS, rep.SITE_GEOMETRY_FIELDS)
    for fields in (*every, rep.PAIR_MATCH_FIELDS, rep.PAIR_SPARSITY_FIELDS):
        for f in fields:
            assert f in md, f
    assert "tiny-A" in md and "resid_post.3" in md
    assert "3.23 [3.19, 3.25]" in md  # eval loss with its CI
    assert "baseline: B's tokens shuffled" in md


def test_failed_premise_is_named_in_the_verdict(report):
    failed = copy.deepcopy(report)
    failed["premises"][1].update(holds=False, detail="(B−A)/A = 0.066 [0.060, 0.071]; not within ±3%")
    failed["verdict"] = {"outcome": "premises_not_met", "reason": "all 2 site pairs agree", "numbers": {}}
    md = rep.render_markdown(failed)
    verdict = md[: md.index("## Premises")]
    assert "Premises not met" in verdict
    assert "P2 equal performance: (B−A)/A = 0.066 [0.060, 0.071]" in verdict
    assert "P1 equal parameters:" not in verdict


def test_markdown_nulls_show_dash(report):
    md = rep.render_markdown(report)
    # B's first site has no pressure: p_star is null.
    row = next(line for line in md.splitlines() if line.startswith("| resid_post.0 | 0 | 0.25 |"))
    assert rep.MISSING in row
