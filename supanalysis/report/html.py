"""The report as one self-contained HTML page: the verdict box, the sections as tables, and the
figures inline as base64 PNGs with captions on how to read them."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping
from typing import Any

from . import figures as _figures
from .blocks import Figure, Section, Table
from .markdown import TITLE
from .sections import build_sections

# Colours of the verdict box (background, border): a contradiction should stand out.
OUTCOME_COLORS = {
    "premises_not_met": ("#f2f2f2", "#888888"),
    "non_universal_features": ("#e8f1fb", "#1f77b4"),
    "contradiction": ("#fdecea", "#c0392b"),
    "sparsity_follows_prediction": ("#fff4e0", "#d98c00"),
    "inconclusive": ("#f2f2f2", "#666666"),
    "universal_within_reproducibility": ("#eaf6ec", "#1a9850"),
}

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1rem 2rem 3rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .3rem; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
.verdict { border: 3px solid; border-radius: 8px; padding: 1rem 1.4rem; margin: 1rem 0 1.5rem; }
.verdict .outcome { font-size: 1.35rem; font-weight: 700; margin: 0 0 .5rem; }
.verdict code { font-size: .9rem; }
.tablewrap { overflow-x: auto; margin: .6rem 0 1rem; }
table { border-collapse: collapse; font-size: .85rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9rem; color: #444; max-width: 900px; }
nav a { margin-right: .8rem; font-size: .9rem; }
"""


def _html_inline(text: str) -> str:
    """Escape, then turn **bold** and `code` spans (the only Markdown the blocks use) into tags."""
    s = html.escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


class _Figures:
    """The rendered figures, and their numbers in order of first appearance on the page."""

    def __init__(self, report: Mapping, arrays: Mapping | None, figures: Mapping[str, bytes] | None) -> None:
        self.specs = {name: (heading, caption) for name, heading, caption in _figures.figure_specs(report)}
        self.error = None
        if figures is None:
            try:
                figures = _figures.render_figures(report, arrays)
            except ImportError as exc:
                self.error, figures = str(exc), {}
        self.figures = figures
        self.numbers: dict[str, int] = {}

    def html(self, name: str) -> str:
        png = self.figures.get(name)
        heading, caption = self.specs.get(name, (name, ""))
        if png is None:
            return f"<p><em>Figure {html.escape(heading)}: {html.escape(self.error or 'not drawn')}</em></p>"
        i = self.numbers.setdefault(name, len(self.numbers) + 1)
        b64 = base64.b64encode(png).decode("ascii")
        return (
            f'<figure id="fig-{name}"><img alt="{html.escape(heading)}" src="data:image/png;base64,{b64}">'
            f"<figcaption><strong>Figure {i}. {html.escape(heading)}.</strong> {html.escape(caption)}"
            "</figcaption></figure>"
        )


def _html_block(block: Any, figs: _Figures) -> str:
    if isinstance(block, Figure):
        return figs.html(block.name)
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
        body = "".join("<tr>" + "".join(f"<td>{_html_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows)
        return f'<div class="tablewrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    if isinstance(block, tuple) and block[0] == "h3":
        return f"<h3>{html.escape(block[1])}</h3>"
    if isinstance(block, list):
        return "<ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in block) + "</ul>"
    return f"<p>{_html_inline(str(block))}</p>"


def _html_verdict(section: Section, outcome: str, figs: _Figures) -> str:
    bg, border = OUTCOME_COLORS.get(outcome, OUTCOME_COLORS["inconclusive"])
    first, *rest = section.blocks
    inner = f'<p class="outcome">{_html_inline(first)}</p>' + "".join(_html_block(b, figs) for b in rest)
    return (
        f'<section id="verdict" class="verdict" style="background:{bg};border-color:{border}">'
        f"<h2 style='margin-top:0;border:none'>Verdict</h2>{inner}</section>"
    )


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def render_html(report: Mapping, arrays: Mapping | None, figures: Mapping[str, bytes] | None = None) -> str:
    """A single self-contained HTML page: the verdict box first with the figure the verdict rests on,
    then the Markdown's sections as HTML tables, each figure (inline base64 PNG, with a caption on how
    to read it) in the section whose numbers it explains.

    ``figures`` may be passed when already rendered (as :func:`write_report` does) to draw them once.
    """
    sections = build_sections(report)
    outcome = str((report.get("verdict") or {}).get("outcome", "inconclusive"))
    figs = _Figures(report, arrays, figures)
    title = TITLE
    models = report.get("models") or {}
    names = " vs ".join(str((models.get(m) or {}).get("name", m)) for m in ("A", "B"))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(names)} · {html.escape(str(report.get('created', '')))}</p>",
        _html_verdict(sections[0], outcome, figs),
        "<nav>" + "".join(f'<a href="#{_anchor(s.title)}">{html.escape(s.title)}</a>' for s in sections[1:]) + "</nav>",
    ]
    for sec in sections[1:]:
        parts.append(f'<section id="{_anchor(sec.title)}"><h2>{html.escape(sec.title)}</h2>')
        parts += [_html_block(b, figs) for b in sec.blocks]
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
