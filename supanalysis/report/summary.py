"""The verdict and the numbers behind it, in a few lines for a terminal."""

from __future__ import annotations

import os
from collections.abc import Mapping


def print_summary(report: Mapping, out: str | os.PathLike) -> None:
    """Print the verdict, each premise, each site pair's numbers, and where the report folder ``out`` is."""
    v = report["verdict"]
    print()
    print(f"verdict: {v['outcome']}: {v['reason']}")
    uni = v.get("universality")
    if uni:
        u = uni.get("U_min")
        u_text = "—" if not u or u.get("value") is None else f"{u['value']:.3f} [{u['lo']:.3f}, {u['hi']:.3f}]"
        flag = "calibrated" if uni.get("calibrated") else "UNCALIBRATED: no within-shape ceiling was measured"
        print(f"universality: {uni.get('outcome')}, U_min {u_text} ({flag})")
    for p in report["premises"]:
        print(f"  {'ok ' if p['holds'] else 'NOT'} {p['name']}: {p['detail']}")
    for pr in report["pairs"]:
        lr = pr["median_log_ratio"]
        lr_text = "—" if lr["value"] is None else f"{lr['value']:.3f} [{lr['lo']:.3f}, {lr['hi']:.3f}]"
        pi = pr["predicted_ratio"]
        print(
            f"  {pr['site_a']} ~ {pr['site_b']}: matched {pr['matched_fraction_a']:.2f} "
            f"(baseline {pr['baseline_fraction_a']:.2f}), median ln ratio {lr_text}, "
            f"π {'—' if pi is None else f'{pi:.3f}'} -> {pr['verdict']['outcome']}"
        )
    print(f"report: {os.path.join(out, 'report.html')} (also report.md, report.json)")
