"""The test end to end: :func:`run_test` is :func:`measure` then :func:`analyse`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import TestConfig, Thresholds
from .analysis import analyse
from .measurements import Measurements
from .measuring import measure


@dataclass
class TestReport:
    """The outcome of :func:`run_test`: the report dict, its arrays, and the measurements."""

    __test__ = False  # not a pytest test class, despite the name

    data: dict
    arrays: dict[str, torch.Tensor]
    measurements: Measurements | None = None

    @property
    def verdict(self) -> dict:
        return self.data["verdict"]

    def reanalyse(self, thresholds: Thresholds) -> TestReport:
        """The same measurements under other thresholds (no model is run again)."""
        if self.measurements is None:
            raise ValueError("this report was loaded from disk without its measurements")
        data, arrays = analyse(self.measurements, thresholds)
        return TestReport(data, arrays, self.measurements)

    def to_json(self) -> dict:
        return self.data

    def to_markdown(self) -> str:
        from ..report import render_markdown

        return render_markdown(self.data)

    def to_html(self) -> str:
        from ..report import render_html

        return render_html(self.data, self.arrays)

    def write(self, folder: str | os.PathLike) -> dict[str, Path]:
        from ..report import write_report

        return write_report(folder, self.data, self.arrays)


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
    meas = measure(cfg, model_a, model_b, models=models, progress=progress, **checkpointing)
    data, arrays = analyse(meas)
    return TestReport(data, arrays, meas)
