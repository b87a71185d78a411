"""The report folder: report.json, arrays.safetensors, report.md, report.html and figures/*.png.

Each file is written durably (temp file, fsync, rename) and report.json last: a folder whose
report.json exists holds a complete report, and a failed write leaves no report.json behind.
report.json carries a ``checksum`` of the rest of itself, checked when it is read back.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..durable import (
    CHECKSUM_KEY,
    ChecksumMismatch,
    WriteError,
    durable_write,
    read_checked_json,
    with_checksum,
    write_bytes,
    write_text,
)
from . import figures as _figures
from .html import render_html
from .markdown import FIGURE_DIR, render_markdown
from .schema import SCHEMA


def to_jsonable(obj: Any) -> Any:
    """``obj`` with NaN/±inf as None (the schema forbids NaN) and numpy/torch/dataclass values as
    plain JSON types."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return to_jsonable(obj.tolist())
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)  # e.g. a torch.dtype in the config: its name is what a reader needs


def _storable(name: str, value: Any) -> torch.Tensor:
    """A contiguous CPU tensor in the schema's dtypes: float64 for reals, int64 for ints and bools."""
    # ascontiguousarray: torch cannot wrap numpy arrays with negative strides (e.g. x[::-1]).
    t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(value))
    t = t.to("cpu")
    if t.is_complex():
        raise TypeError(f"array {name!r} is complex; the report stores real arrays only")
    t = t.to(torch.float64) if t.is_floating_point() else t.to(torch.int64)
    return t.contiguous()


def write_report(folder: str | os.PathLike, report: Mapping, arrays: Mapping | None) -> dict[str, Path]:
    """Write arrays.safetensors, the figures (``figures/<name>.png``, linked from report.md),
    report.md, report.html and then report.json into ``folder`` (created if needed), each durably.
    Returns {"json", "arrays", "markdown", "html"} → path.

    The JSON is the report with NaN/inf turned into null; Markdown and HTML are rendered from that
    same cleaned dict, so all three agree. Everything is rendered before the first byte is written,
    and a stale report.json is removed first, so a failure (disk full, permission denied) raises one
    :class:`~supanalysis.durable.WriteError` naming the file and leaves no report.json.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    clean = {k: v for k, v in to_jsonable(report).items() if k != CHECKSUM_KEY}  # a loaded report's is stale
    if clean.get("schema") is None:
        clean["schema"] = SCHEMA
    tensors = {str(k): _storable(str(k), v) for k, v in (arrays or {}).items() if v is not None}
    paths = {
        "json": folder / "report.json",
        "arrays": folder / "arrays.safetensors",
        "markdown": folder / "report.md",
        "html": folder / "report.html",
    }
    try:  # drawn once: the HTML inlines the same PNGs the Markdown links
        figures: dict[str, bytes] | None = _figures.render_figures(clean, tensors)
    except ImportError:
        figures = None
    text = {
        "markdown": render_markdown(clean, FIGURE_DIR if figures is not None else None),
        "html": render_html(clean, tensors, figures),
        "json": json.dumps(with_checksum(clean), indent=2, allow_nan=False, ensure_ascii=False) + "\n",
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        paths["json"].unlink(missing_ok=True)
        if figures:
            (folder / FIGURE_DIR).mkdir(exist_ok=True)
    except OSError as exc:
        raise WriteError(exc.errno, f"cannot write {paths['json']}: {exc.strerror or exc}") from exc
    durable_write(paths["arrays"], lambda tmp: save_file(tensors, tmp, metadata={"schema": SCHEMA}))
    for name, data in (figures or {}).items():
        write_bytes(folder / FIGURE_DIR / f"{name}.png", data)
    write_text(paths["markdown"], text["markdown"])
    write_text(paths["html"], text["html"])
    write_text(paths["json"], text["json"])
    return paths


def load_report(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read report.json and arrays.safetensors back (safetensors only: no pickle is ever loaded).

    Raises ValueError when the JSON fails its checksum (altered or corrupted since it was
    written) or is not schema ``supanalysis.test_report/1``, and FileNotFoundError when a file
    is missing. A report written before reports carried a checksum loads without one. The
    returned dict is the report as written, without the checksum.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    jpath, apath = folder / "report.json", folder / "arrays.safetensors"
    for p in (jpath, apath):
        if not p.is_file():
            raise FileNotFoundError(f"not a supanalysis report folder: {p} is missing")
    try:
        report, _ = read_checked_json(jpath)
    except ChecksumMismatch as exc:
        raise ValueError(
            f"{exc}; refusing to read it. Write the report again from its run, or, if you edited it "
            f"on purpose, delete its {CHECKSUM_KEY!r} field to vouch for it yourself"
        ) from None
    schema = report.get("schema")
    if schema != SCHEMA:
        raise ValueError(f"{jpath}: expected schema {SCHEMA!r}, found {schema!r}")
    try:
        arrays = load_file(str(apath))
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt files
        raise ValueError(f"{apath}: not a readable safetensors file ({exc})") from exc
    return report, arrays
