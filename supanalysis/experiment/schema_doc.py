"""The objects section of ``docs/report-schema.md``, generated from :mod:`.rows`.

``python -m supanalysis.experiment.schema_doc [docs/report-schema.md]`` rewrites the
section between the markers in place; a test checks that the committed page equals it.
"""

from __future__ import annotations

import re
import sys
from dataclasses import fields
from pathlib import Path

from .rows import SCHEMA_OBJECTS, field_docs

BEGIN = "<!-- generated from supanalysis/experiment/rows.py by supanalysis.experiment.schema_doc: edit those -->"
END = "<!-- end of the generated section -->"
_JSON_NAMES = {"ModelRow": "Model", "PerModelRow": "PerModel", "SiteRow": "Site", "PairRow": "Pair",
               "AnyLayerRow": "AnyLayer", "LibraryRow": "Library", "UniversalityRow": "Universality",
               "FamilyRow": "Family", "FamilyModelRow": "FamilyModel", "MatrixRow": "Matrix",
               "CeilingRow": "Ceiling", "RelativeRow": "Relative", "PooledRow": "Pooled", "TimingsRow": "Timings",
               "StageRow": "Stage"}  # fmt: skip


def _type_name(annotation: object) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return re.sub(r"\b\w+Row\b", lambda m: _JSON_NAMES.get(m.group(0), m.group(0)), text)


def object_markdown(cls: type) -> str:
    """One object: its title, then a bullet per field, in the JSON's order."""
    title, docs = field_docs(cls)
    names = [f.name for f in fields(cls)]
    if sorted(docs) != sorted(names):
        missing, extra = set(names) - set(docs), set(docs) - set(names)
        raise ValueError(f"{cls.__name__}'s docstring documents other fields (missing {missing}, extra {extra})")
    lines = [title, ""]
    for f in fields(cls):
        lines.append(f"- `{f.name}` (`{_type_name(f.type)}`): {docs[f.name]}")
    return "\n".join(lines)


def generated_section() -> str:
    """Every object of the schema, between the markers."""
    body = "\n\n".join(object_markdown(cls) for cls in SCHEMA_OBJECTS)
    return f"{BEGIN}\n\n{body}\n\n{END}"


def with_generated_section(page: str) -> str:
    """``page`` with the text between the markers (the markers included) regenerated."""
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise ValueError("the page has no generated section (its begin and end markers)")
    return page[:start] + generated_section() + page[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "docs/report-schema.md")
    page = path.read_text(encoding="utf-8")
    new = with_generated_section(page)
    if new != page:
        from ..durable import write_text

        write_text(path, new)
        print(f"rewrote the generated section of {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
