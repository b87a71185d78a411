"""The test end to end: :func:`run_test` is :func:`measure` then :func:`analyse`, timed stage
by stage (:mod:`.timing`) into the report's ``timings``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import TestConfig, Thresholds
from .analysis import analyse
from .measurements import Measurements
from .measuring import measure
from .plan import run_device
from .timing import StageClock


@dataclass
class TestReport:
    """The outcome of :func:`run_test`: the report dict, its arrays, the measurements, and the
    clock that timed them (None for a report loaded from disk)."""

    __test__ = False  # not a pytest test class, despite the name

    data: dict
    arrays: dict[str, torch.Tensor]
    measurements: Measurements | None = None
    clock: StageClock | None = None

    @property
    def verdict(self) -> dict:
        return self.data["verdict"]

    def reanalyse(self, thresholds: Thresholds) -> TestReport:
        """The same measurements under other thresholds (no model is run again)."""
        if self.measurements is None:
            raise ValueError("this report was loaded from disk without its measurements")
        # The measurement stages are the ones behind these numbers; only the analysis is new.
        clock = self.clock.without(("analysis", "report")) if self.clock is not None else None
        return analysed(self.measurements, thresholds, clock)

    def to_json(self) -> dict:
        return self.data

    def to_markdown(self) -> str:
        from ..report import render_markdown

        return render_markdown(self.data)

    def to_html(self) -> str:
        from ..report import render_html

        return render_html(self.data, self.arrays)

    def write(self, folder: str | os.PathLike) -> dict[str, Path]:
        """The report folder (:func:`~supanalysis.report.write_report`). With a clock, the time it
        took is known only once it is written: report.json is then rewritten with the "report"
        stage added (durably, so it stays complete at every instant); report.md and report.html
        keep the stages before it."""
        from ..report import write_report

        if self.clock is None:
            return write_report(folder, self.data, self.arrays)
        clock = self.clock.without(("report",))  # a second write replaces the first one's time
        self.data["timings"] = clock.to_json()
        with clock.stage("report"):
            paths = write_report(folder, self.data, self.arrays)
        self.clock = clock
        self.data["timings"] = clock.to_json()
        add_timings(paths["json"], self.data["timings"])
        return paths


def run_test(
    config: TestConfig | str | os.PathLike,
    model_a: nn.Module | None = None,
    model_b: nn.Module | None = None,
    *,
    models: list[nn.Module | None] | None = None,
    progress: bool = True,
    **checkpointing,
) -> TestReport:
    """Measure and analyse; ``config`` is a :class:`TestConfig` or a TOML/JSON file.

    ``models``: in-memory modules of a family config (``config.models``), in its order; None
    entries are loaded from their folders.

    ``checkpointing``: ``checkpoint_dir``, ``resume``, ``checkpoint_every_tokens``,
    ``checkpoint_every_seconds`` as in :func:`measure`. Inside a torch.distributed process
    group every rank returns the same report (write it from rank 0).
    """
    cfg = config if isinstance(config, TestConfig) else TestConfig.load(config)
    clock = StageClock(run_device(cfg))
    meas = measure(cfg, model_a, model_b, models=models, progress=progress, clock=clock, **checkpointing)
    return analysed(meas, None, clock)


def analysed(meas: Measurements, thresholds: Thresholds | None, clock: StageClock | None) -> TestReport:
    """:func:`analyse` as a :class:`TestReport`, timed on ``clock`` (whose stages become the
    report's ``timings``) when there is one."""
    if clock is None:
        data, arrays = analyse(meas, thresholds)
        return TestReport(data, arrays, meas)
    with clock.stage("analysis"):
        data, arrays = analyse(meas, thresholds)
    data["timings"] = clock.to_json()
    return TestReport(data, arrays, meas, clock)


def add_timings(path: Path, timings: dict) -> None:
    """Rewrite the report.json at ``path`` with ``timings`` (durably: the old file stays until
    the new one is complete), keeping everything else as written and its checksum valid."""
    from ..durable import read_checked_json, with_checksum, write_text

    body, checksummed = read_checked_json(path)
    body["timings"] = timings
    page = with_checksum(body) if checksummed else body
    write_text(path, json.dumps(page, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
