"""The report as Markdown, and the Markdown pieces other writers reuse (escaped text, tables)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .blocks import Figure, Table
from .figures import figure_specs
from .sections import build_sections

TITLE = "Superposition versus universality: test report"

#: the report folder's subfolder of figure PNGs, as the Markdown links them
FIGURE_DIR = "figures"


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


def md_figure(name: str, number: int, specs: Mapping[str, tuple[str, str]], figure_dir: str | None) -> str:
    """A figure as an image link to ``figure_dir/<name>.png`` and its caption; without a folder of
    figures, the caption alone, saying so."""
    heading, caption = specs.get(name, (name, ""))
    text = f"*Figure {number}. {heading}.* {caption}"
    if figure_dir is None:
        return md_text(f"{text} (figure not drawn: matplotlib is not installed)")
    return f"![Figure {number}. {heading}]({figure_dir}/{name}.png)\n\n{md_text(text)}"


def md_block(block: Any) -> str:
    """One section block (Table, ("h3", text), list of bullets, or a paragraph) as Markdown."""
    if isinstance(block, Table):
        return md_table(block.headers, block.rows)
    if isinstance(block, tuple) and block[0] == "h3":
        return f"### {block[1]}"
    if isinstance(block, list):
        return "\n".join(f"- {md_text(item)}" for item in block)
    return md_text(str(block))


def render_markdown(report: Mapping, figure_dir: str | None = FIGURE_DIR) -> str:
    """The report as Markdown: verdict first, then premises, models, the family, conventions, sites,
    pairs, any-layer matches, notes and the run's provenance; each figure linked (as
    ``figure_dir/<name>.png``, where :func:`write_report` puts them) beside the numbers it explains."""
    specs = {name: (heading, caption) for name, heading, caption in figure_specs(report)}
    numbers: dict[str, int] = {}
    out = [f"# {TITLE}", ""]
    for sec in build_sections(report):
        out += [f"## {sec.title}", ""]
        for block in sec.blocks:
            if isinstance(block, Figure):
                n = numbers.setdefault(block.name, len(numbers) + 1)
                out += [md_figure(block.name, n, specs, figure_dir), ""]
            else:
                out += [md_block(block), ""]
    return "\n".join(out)
