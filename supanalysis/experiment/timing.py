"""Where a run's wall time goes: a clock with one context manager per stage.

``with clock.stage("statistics") as st: ...; st.count(tokens)`` adds the block's wall seconds,
one call and its tokens to the stage; the peak memory is read as the stage ends. A stage may
run many times (a site's SAE training, a batch's forward) and stages may nest (the parts of
the measurement pass inside it). On CUDA both ends of a stage synchronise, so its seconds
are the device's work rather than the time to queue it; the stages inside the measurement
loop (``per_batch=True``) are timed with CUDA events instead, so the loop never waits on the
host for them, and their times are read once the events have completed.

The timings are not deterministic: they go into the report's ``timings`` object
(:class:`TimingsRow`), which no two runs are compared on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from ..distributed import rank_world


@dataclass
class StageRow:
    """`Stage`: one stage of the run, timed on this process (`timings.stages[k]`).

    stage: "plan" (token file and slices), "load_models", "eval_losses", "sae_training" (every
        site trained, in total), "dictionaries" (dictionaries loaded), "geometry" (decoder
        interference), "statistics" (the measurement pass), its parts "statistics.forward" (the
        models' forwards and captures), "statistics.codes" (encoding and activation statistics),
        "statistics.matching" (cross-model co-moments) and "statistics.checkpoint", "tiled_matching",
        "all_reduce", "analysis", "report" (writing the report folder); only the stages that ran
    seconds: wall seconds, summed over its calls (on CUDA, synchronised at both ends)
    calls: times it ran (e.g. once per site for sae_training)
    tokens: tokens of the token file it processed, summed over its calls (eval_losses: each model's;
        sae_training: each site's training tokens; statistics and its parts: each batch once, however
        many models it goes through), null for stages that process none
    tokens_per_second: tokens / seconds, null without tokens
    peak_rss_bytes: the process's peak resident memory when the stage last ended (getrusage, since
        the process started), null where unavailable
    peak_cuda_bytes: torch.cuda.max_memory_allocated when the stage last ended (since the process
        started or last reset it), null off CUDA
    """

    stage: str
    seconds: float
    calls: int
    tokens: int | None
    tokens_per_second: float | None
    peak_rss_bytes: int | None
    peak_cuda_bytes: int | None


@dataclass
class TimingsRow:
    """`Timings`: where the run's wall time went (`timings`). Not deterministic: two runs of the
    same config differ here.

    seconds: wall seconds from the start of the measurement to the end of the last stage
    world_size: processes of the run; the timings are those of the process that wrote the report
        (rank 0)
    torch_threads: torch's CPU threads (torch.get_num_threads)
    peak_rss_bytes: the process's peak resident memory (getrusage), null where unavailable
    peak_cuda_bytes: torch.cuda.max_memory_allocated at the end, null off CUDA
    stages: the stages, in the order they first ran. The "report" stage is known only once the
        report folder is written: it is added to report.json (rewritten in place, atomically)
        after report.md and report.html, which therefore show every stage but that one
    """

    seconds: float
    world_size: int
    torch_threads: int
    peak_rss_bytes: int | None
    peak_cuda_bytes: int | None
    stages: list[StageRow]


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size so far, or None where ``resource`` is missing."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS counts bytes, Linux KiB


def peak_cuda_bytes(device: torch.device | None) -> int | None:
    """``torch.cuda.max_memory_allocated`` of ``device``, None off CUDA."""
    if device is None or device.type != "cuda" or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated(device))


@dataclass
class Stage:
    """One stage's running totals."""

    name: str
    seconds: float = 0.0
    calls: int = 0
    tokens: int | None = None
    peak_rss_bytes: int | None = None
    peak_cuda_bytes: int | None = None
    # CUDA (start, end) events of per-batch calls whose time is not yet added to ``seconds``
    pending: list = field(default_factory=list, repr=False)

    def settle(self, wait: bool) -> None:
        """Add the completed events' times to ``seconds`` (all of them, waiting, when ``wait``)."""
        while self.pending and (wait or self.pending[0][1].query()):
            start, end = self.pending.pop(0)
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1e3

    def count(self, tokens: int) -> None:
        """``tokens`` more were processed in this stage."""
        self.tokens = (self.tokens or 0) + int(tokens)

    def row(self) -> StageRow:
        self.settle(wait=True)
        rate = self.tokens / self.seconds if self.tokens is not None and self.seconds > 0 else None
        return StageRow(self.name, self.seconds, self.calls, self.tokens, rate, self.peak_rss_bytes,
                        self.peak_cuda_bytes)  # fmt: skip


class StageClock:
    """Wall seconds, calls, tokens and peak memory per named stage of one run (module docstring)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.started = time.perf_counter()
        self.ended = self.started
        self.stages: dict[str, Stage] = {}

    def _on_cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda" and torch.cuda.is_initialized()

    def _sync(self) -> None:
        if self._on_cuda():
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str, tokens: int | None = None, *, per_batch: bool = False) -> Iterator[Stage]:
        """Time the block as (one more call of) stage ``name``; a block that raises is not counted.
        ``per_batch``: on CUDA, time it with events rather than synchronising (module docstring)."""
        st = self.stages.setdefault(name, Stage(name))
        events = per_batch and self._on_cuda()
        if events:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            self._sync()
        t0 = time.perf_counter()
        yield st
        if events:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            st.pending.append((start, end))
            st.settle(wait=False)
        else:
            self._sync()
        self.ended = time.perf_counter()
        if not events:
            st.seconds += self.ended - t0
        st.calls += 1
        if tokens is not None:
            st.count(tokens)
        st.peak_rss_bytes = peak_rss_bytes()
        st.peak_cuda_bytes = peak_cuda_bytes(self.device)

    def without(self, names: Iterable[str]) -> StageClock:
        """A copy of this clock without the stages ``names`` (to time them again): its total
        is this one's less those stages, and goes on from now."""
        drop = set(names)
        for st in self.stages.values():
            st.settle(wait=True)
        out = StageClock(self.device)
        kept = self.ended - self.started - sum(s.seconds for k, s in self.stages.items() if k in drop)
        out.ended = time.perf_counter()
        out.started = out.ended - max(kept, 0.0)
        out.stages = {
            k: Stage(v.name, v.seconds, v.calls, v.tokens, v.peak_rss_bytes, v.peak_cuda_bytes)
            for k, v in self.stages.items()
            if k not in drop
        }
        return out

    def row(self) -> TimingsRow:
        return TimingsRow(
            seconds=self.ended - self.started,
            world_size=rank_world()[1],
            torch_threads=torch.get_num_threads(),
            peak_rss_bytes=peak_rss_bytes(),
            peak_cuda_bytes=peak_cuda_bytes(self.device),
            stages=[s.row() for s in self.stages.values()],
        )

    def to_json(self) -> dict:
        """:meth:`row` as the JSON object of the report's ``timings``."""
        return asdict(self.row())
