"""Rows of results and their rendering: a plain table, Markdown for RESULTS.md, JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

COLUMNS = ("op", "shape", "dtype", "backend", "median", "achieved", "% limit", "vs ref", "vs user", "vs bare", "note")


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    backend: str
    unit: str  # "B", "FLOP" or "incr"
    work: float  # per call, in unit
    seconds: float | None = None  # median; None when skipped
    iqr: float | None = None
    samples: int = 0
    limit: float | None = None  # the measured limit (unit per second) this row is held against
    vs_ref: float | None = None  # reference time / this time
    vs_user: float | None = None  # user-baseline time / this time
    vs_bare: float | None = None  # bare-primitive time / this time (ops that have one)
    note: str = ""

    @property
    def rate(self) -> float | None:
        return self.work / self.seconds if self.seconds else None

    @property
    def pct(self) -> float | None:
        return 100 * self.rate / self.limit if self.rate and self.limit else None


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    for scale, unit in ((1, "s"), (1e-3, "ms"), (1e-6, "us")):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_rate(rate: float | None, unit: str) -> str:
    if rate is None:
        return "-"
    if unit == "B":
        return f"{rate / 1e9:.3g} GB/s"
    if unit == "FLOP":
        return f"{rate / 1e12:.3g} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.3g} GFLOP/s"
    return f"{rate / 1e9:.3g} G {unit}/s" if rate >= 1e9 else f"{rate / 1e6:.3g} M {unit}/s"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}x"


def cells(r: Row) -> list[str]:
    pct = "-" if r.pct is None else f"{r.pct:.3g}%"
    return [
        r.op,
        r.shape,
        r.dtype,
        r.backend,
        fmt_time(r.seconds),
        fmt_rate(r.rate, r.unit),
        pct,
        fmt_ratio(r.vs_ref),
        fmt_ratio(r.vs_user),
        fmt_ratio(r.vs_bare),
        r.note,
    ]


def table(rows: list[Row]) -> str:
    body = [list(COLUMNS), *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in body) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(header: dict, rows: list[Row], notes: list[str]) -> str:
    out = ["## " + f"{header['device']} ({header['date']})", ""]
    out += [f"- {k}: {v}" for k, v in header.items()]
    out += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |" for r in rows]
    out += ["", *(f"- {n}" for n in notes), ""]
    return "\n".join(out)


def to_json(header: dict, rows: list[Row], notes: list[str]) -> str:
    def clean(x):
        return None if isinstance(x, float) and not math.isfinite(x) else x

    data = [{**asdict(r), "rate": clean(r.rate), "pct_limit": clean(r.pct)} for r in rows]
    return json.dumps({"header": header, "notes": notes, "rows": data}, indent=1)
