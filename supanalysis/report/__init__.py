"""Rendering of the test report: Markdown, figures, a self-contained HTML page, and the report folder.

The report dict and arrays follow ``docs/report-schema.md`` (schema ``supanalysis.test_report/1``).
This package only reads them: it never recomputes a statistic, so every number a reader sees is
the number in ``report.json``. Markdown and HTML share one intermediate form
(:func:`~supanalysis.report.sections.build_sections`) so the two can never disagree.

Modules: ``schema`` (names and field orders), ``format`` (one value as a cell), ``blocks`` (what a
section is made of), ``sections`` and ``sections_family`` (a family's verdict, models, ceilings and U),
``markdown``, ``html``, ``figures`` and ``figures_family``, ``write`` (the report folder), ``summary``
(terminal lines).
"""

from __future__ import annotations

from .blocks import Figure
from .figures import (
    COLORS,
    DENSITY_EPS,
    DIM_REFERENCES,
    FIGURES,
    MARKERS,
    figure_specs,
    new_figure,
    png,
    render_figures,
)
from .figures_family import FAMILY_FIGURES
from .format import MISSING, fmt, fmt_estimate
from .html import render_html
from .markdown import md_table, render_markdown
from .schema import (
    MODEL_FIELDS,
    PAIR_MATCH_FIELDS,
    PAIR_SPARSITY_FIELDS,
    PER_MODEL_FIELDS,
    SCHEMA,
    SITE_GEOMETRY_FIELDS,
    SITE_SPARSITY_FIELDS,
    pair_key,
    sanitize,
)
from .sections import DECISION_RULES, OUTCOME_WORDS, Section, Table, build_sections
from .summary import print_summary
from .write import load_report, to_jsonable, write_report

__all__ = [
    "COLORS",
    "DECISION_RULES",
    "DENSITY_EPS",
    "DIM_REFERENCES",
    "FAMILY_FIGURES",
    "FIGURES",
    "MARKERS",
    "MISSING",
    "MODEL_FIELDS",
    "OUTCOME_WORDS",
    "PAIR_MATCH_FIELDS",
    "PAIR_SPARSITY_FIELDS",
    "PER_MODEL_FIELDS",
    "SCHEMA",
    "SITE_GEOMETRY_FIELDS",
    "SITE_SPARSITY_FIELDS",
    "Figure",
    "Section",
    "Table",
    "build_sections",
    "figure_specs",
    "fmt",
    "fmt_estimate",
    "load_report",
    "md_table",
    "new_figure",
    "pair_key",
    "png",
    "print_summary",
    "render_figures",
    "render_html",
    "render_markdown",
    "sanitize",
    "to_jsonable",
    "write_report",
]
