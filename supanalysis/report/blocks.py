"""The blocks a report section is made of, shared by the Markdown and HTML renderers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Table:
    """A table of already formatted cells: ``rows`` is [n_rows][len(headers)]."""

    headers: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    """A figure placed beside the numbers it explains: ``name`` is a key of the rendered figures."""

    name: str


@dataclass
class Section:
    """One section of the report: a title and blocks (str paragraph, list of str bullets, Table,
    Figure, or a ("h3", text) sub-heading)."""

    title: str
    blocks: list[Any]
