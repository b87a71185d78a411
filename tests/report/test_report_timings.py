"""The Run section's timings table: what a report with timings shows, and one without them."""

from __future__ import annotations

import copy

from supanalysis import report as rep
from supanalysis.report.sections import TIMING_HEADERS


def _stage(name, seconds, tokens=None, cuda=None):
    rate = tokens / seconds if tokens else None
    return {"stage": name, "seconds": seconds, "calls": 2, "tokens": tokens, "tokens_per_second": rate,
            "peak_rss_bytes": 3 << 20, "peak_cuda_bytes": cuda}  # fmt: skip


def with_timings(report, *, report_stage=False, cuda=None):
    out = copy.deepcopy(report)
    stages = [_stage("plan", 0.0004), _stage("statistics", 12.5, 1_000_000, cuda), _stage("analysis", 0.25)]
    if report_stage:
        stages.append(_stage("report", 1.5))
    out["timings"] = {"seconds": 14.75, "world_size": 1, "torch_threads": 2, "peak_rss_bytes": 5 << 20,
                      "peak_cuda_bytes": cuda, "stages": stages}  # fmt: skip
    return out


def timings_text(md: str) -> str:
    return md[md.index("### Timings") : md.index("### Configuration")]


def test_the_run_section_has_a_row_per_stage(report):
    text = timings_text(rep.render_markdown(with_timings(report), figure_dir=None))
    assert "| " + " | ".join(TIMING_HEADERS) + " |" in text
    assert "| statistics | 12.500 | 2 | 1,000,000 | 80,000 | 3.0 | — |" in text
    assert "| plan | 0.000 | 2 | — | — | 3.0 | — |" in text
    assert "14.750 s in all, 2 torch CPU threads, peak RSS 5.0 MiB." in text  # no CUDA: no CUDA peak
    assert "its time is in report.json only" in text  # no report stage yet when the page is drawn


def test_cuda_peaks_and_a_recorded_report_stage_show(report):
    text = timings_text(rep.render_markdown(with_timings(report, report_stage=True, cuda=7 << 20), figure_dir=None))
    assert "| statistics | 12.500 | 2 | 1,000,000 | 80,000 | 3.0 | 7.0 |" in text
    assert "peak CUDA 7.0 MiB." in text
    assert "| report | 1.500 |" in text and "report.json only" not in text


def test_a_report_without_timings_still_renders(report, arrays, tmp_path):
    old = {k: v for k, v in report.items() if k != "timings"}  # written before reports carried timings
    rep.write_report(tmp_path, old, arrays)
    loaded, loaded_arrays = rep.load_report(tmp_path)
    assert "timings" not in loaded
    for page in (rep.render_markdown(loaded, figure_dir=None), rep.render_html(loaded, loaded_arrays, {})):
        assert "No timings recorded" in page
    assert "No timings recorded" in rep.render_markdown({**old, "timings": None}, figure_dir=None)


def test_html_shows_the_same_table(report):
    page = rep.render_html(with_timings(report), None, {})
    assert "<h3>Timings</h3>" in page and "<td>statistics</td><td>12.500</td>" in page
