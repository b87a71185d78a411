"""The report's schema has one source: rows.py's dataclasses (the JSON's keys, the doc page)."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pytest

from supanalysis.experiment import rows, schema_doc

DOC = Path(__file__).resolve().parents[2] / "docs" / "report-schema.md"


def test_the_schema_page_is_generated_from_the_rows():
    page = DOC.read_text(encoding="utf-8")
    assert page == schema_doc.with_generated_section(page), (
        "docs/report-schema.md differs from rows.py: run python -m supanalysis.experiment.schema_doc"
    )
    # Every field of every object is listed, once, in the JSON's order.
    for cls in rows.SCHEMA_OBJECTS:
        listed = [line.split("`")[1] for line in schema_doc.object_markdown(cls).splitlines() if line.startswith("- `")]
        assert listed == [f.name for f in fields(cls)], cls.__name__
        assert schema_doc.object_markdown(cls) in page, cls.__name__


def test_field_tuples_follow_the_dataclasses():
    assert rows.SITE_FIELDS == tuple(f.name for f in fields(rows.SiteRow))
    assert rows.PAIR_FIELDS[:2] == ("site_a", "site_b") and rows.PAIR_FIELDS[-1] == "verdict"
    assert rows.ESTIMATE_FIELDS == ("value", "lo", "hi", "n", "level")
    assert rows.REPORT_FIELDS[0] == "schema" and rows.REPORT_SCHEMA == "supanalysis.test_report/1"
    assert rows.field_docs(rows.Report)[1]["schema"] == f'"{rows.REPORT_SCHEMA}"'


def test_a_field_without_documentation_cannot_be_rendered():
    from dataclasses import dataclass

    @dataclass
    class Row:
        """`Row`: a row.

        x: documented
        gone: documented, but no field
        """

        x: int
        y: int

    with pytest.raises(ValueError, match=r"missing \{'y'\}, extra \{'gone'\}"):
        schema_doc.object_markdown(Row)


def test_sanitize_and_pair_key():
    assert rows.sanitize("mlp<hidden>.1") == "mlp_hidden_.1"
    assert rows.sanitize("blocks.3/hook resid") == "blocks.3_hook_resid"
    assert rows.pair_key("a b", "c/d") == "a_b__c_d"


def test_json_safe_has_no_nan():
    got = rows.json_safe({"a": math.nan, "b": (1.0, math.inf), "c": [{"d": -math.inf}], "e": "x"})
    assert got == {"a": None, "b": [1.0, None], "c": [{"d": None}], "e": "x"}
    assert rows.finite_or_none(math.nan) is None and rows.finite_or_none(2) == 2.0
