"""The report as Markdown, and the Markdown pieces other writers reuse (escaped text, tables)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .sections import Table, build_sections

TITLE = "Superposition versus universality: test report"


def md_text(s: str) -> str:
    """``s`` with angle brackets escaped: a site name like ``mlp<hidden>`` would otherwise read as a tag."""
    return s.replace("<", "\\<").replace(">", "\\>")


def md_cell(s: str) -> str:
    """``s`` safe inside a table cell: a pipe or newline would break the row."""
    return md_text(s).replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; ``rows`` is [n_rows][len(headers)] of already formatted cells."""
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |"]
    lines.append("|" + "---|" * len(headers))
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def md_block(block: Any) -> str:
    """One section block (Table, ("h3", text), list of bullets, or a paragraph) as Markdown."""
    if isinstance(block, Table):
        return md_table(block.headers, block.rows)
    if isinstance(block, tuple) and block[0] == "h3":
        return f"### {block[1]}"
    if isinstance(block, list):
        return "\n".join(f"- {md_text(item)}" for item in block)
    return md_text(str(block))


def render_markdown(report: Mapping) -> str:
    """The report as Markdown: verdict first, then premises, models, conventions, sites, pairs,
    any-layer matches, notes and the run's provenance."""
    out = [f"# {TITLE}", ""]
    for sec in build_sections(report):
        out += [f"## {sec.title}", ""]
        for block in sec.blocks:
            out += [md_block(block), ""]
    return "\n".join(out)
