"""How one value of the report reads in a table cell: nulls and NaN as "—", estimates with their CI."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

MISSING = "—"


def is_estimate(x: Any) -> bool:
    return isinstance(x, Mapping) and {"value", "lo", "hi"} <= set(x)


def finite(x: Any) -> float | None:
    """``x`` as a float when it is a finite real number (not a bool), else None."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt(x: Any, digits: int = 4) -> str:
    """Format one value for a table: nulls and NaN as "—", ints with separators, floats to ``digits``.

    Very large or small floats use scientific notation so densities stay readable.
    """
    if x is None:
        return MISSING
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        v = float(x)
        if not math.isfinite(v):
            return MISSING
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e9 or a < 1e-3:
            return f"{v:.{digits - 1}e}"
        if a >= 10**digits or v.is_integer():  # counts stored as floats: no spurious exponent
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    if is_estimate(x):
        return fmt_estimate(x, digits)
    if isinstance(x, Mapping):
        if "outcome" in x:  # a verdict: its outcome is what fits in a cell
            return str(x["outcome"])
        return ", ".join(f"{k}: {fmt(v, digits)}" for k, v in x.items()) or MISSING
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt(v, digits) for v in x) or MISSING
    return str(x)


def fmt_estimate(e: Mapping, digits: int = 4) -> str:
    """``value [lo, hi] (n=…, 95% CI)``; a null value gives "—"."""
    if finite(e.get("value")) is None:
        return MISSING
    s = f"{fmt(e['value'], digits)} [{fmt(e.get('lo'), digits)}, {fmt(e.get('hi'), digits)}]"
    extra = []
    if e.get("n") is not None:
        extra.append(f"n={fmt(e['n'])}")
    level = finite(e.get("level"))
    if level is not None:
        extra.append(f"{level:.0%} CI")
    return s + (f" ({', '.join(extra)})" if extra else "")


def as_estimate(x: Any) -> dict:
    """An Estimate dict from an Estimate, a bare number (no CI) or None ({})."""
    if is_estimate(x):
        return dict(x)
    return {} if finite(x) is None else {"value": x, "lo": None, "hi": None}


def flatten(numbers: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as (dotted key, value) rows; estimates stay whole so they print as one CI."""
    if not isinstance(numbers, Mapping) or is_estimate(numbers):
        return [(prefix or "value", numbers)]
    rows: list[tuple[str, Any]] = []
    for k, v in numbers.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and not is_estimate(v) and v:
            rows.extend(flatten(v, key))
        else:
            rows.append((key, v))
    return rows
