"""A crash at every step of the durable-write protocol: resume gives the uninterrupted result.

Every os-level call supanalysis.durable makes to write a file (opening and writing the temp
file, chmod, fsync, rename, the folder's open and fsync, the lock file's writes) is counted in
an uninterrupted run; then, for each count i, a run dies at the i-th call. Dying means: that
call raises, and so does every later one (a dead process cleans nothing up, so its temp files
stay), and each temp file, and the file last opened for writing if it is still there, is cut to
half its length (a write torn mid-way). The folder must then hold only complete files under
their real names, and a resume must give exactly what the uninterrupted run gave. New write
steps in durable.py are covered without touching this file.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import supanalysis as sa
from supanalysis import durable
from supanalysis.dictionary import TopKTrainConfig, train_topk_sae
from supanalysis.experiment.state import MeasureCheckpoint, prefixed, unprefixed

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

#: durable.py's os-level calls that write; each one is a point at which the process may die
STEPS = ("open", "fsync", "replace", "chmod", "ftruncate", "pwrite")


class Crash(BaseException):
    """The process died at this call (BaseException: no library code may catch it)."""


class Steps:
    """Counts durable.py's write steps; from step ``crash_at`` on, each raises :class:`Crash`.

    ``versions`` collects, per destination (relative to ``root``), the sha256 of every file a
    rename put there: the only contents a reader may ever find under that name.
    """

    def __init__(self, root: Path, crash_at: int | None = None) -> None:
        self.root, self.calls, self.crash_at, self.dead = root, 0, crash_at, False
        self.versions: dict[str, set[str]] = defaultdict(set)
        self.in_flight: Path | None = None  # the file last opened for writing

    def wrap(self, name: str, real, counted: bool = True):
        def call(*args, **kwargs):
            if self.dead:
                raise Crash(f"{name} after the crash")
            if counted:
                self.calls += 1
                if self.calls - 1 == self.crash_at:
                    self.dead = True
                    raise Crash(f"{name}, step {self.crash_at}")
            if name == "replace":
                self.versions[str(Path(args[1]).relative_to(self.root))].add(_sha(Path(args[0])))
            if name == "builtins.open" and any(c in (args[1] if len(args) > 1 else "r") for c in "wax+"):
                self.in_flight = Path(args[0])
            return real(*args, **kwargs)

        return call


class _Os:
    """durable.py's view of ``os``: the write steps go through :class:`Steps`, so does unlink
    (a dead process removes nothing); everything else is the real module."""

    def __init__(self, steps: Steps) -> None:
        self._steps = steps

    def __getattr__(self, name: str):
        real = getattr(os, name)
        if name in STEPS or name == "unlink":
            return self._steps.wrap(name, real, counted=name != "unlink")
        return real


@contextlib.contextmanager
def stepping(root: Path, crash_at: int | None = None):
    steps = Steps(root, crash_at)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(durable, "os", _Os(steps))
        m.setattr(durable, "open", steps.wrap("builtins.open", builtins.open), raising=False)
        yield steps


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def crash_then_check(root: Path, run, crash_at: int, versions: dict[str, set[str]]) -> None:
    """Run ``run(root)`` dying at step ``crash_at``; tear its temp files; then every finished
    file in ``root`` must be one a rename of the uninterrupted run put there."""
    with stepping(root, crash_at) as steps, pytest.raises(Crash):
        run(root)
    torn = {p for p in root.rglob("*") if durable.is_temp(p)}
    torn |= {steps.in_flight} if steps.in_flight is not None and steps.in_flight.is_file() else set()
    for p in torn:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    for rel, sha in _files(root).items():
        if not durable.is_temp(root / rel) and rel != durable.LOCK_FILE:
            assert sha in versions[rel], (crash_at, rel)


def every_crash_point(tmp_path: Path, run, leftover=lambda rel: False) -> int:
    """Crash ``run`` at each of its steps and resume it; returns the number of steps.

    The resumed folder must be byte for byte the uninterrupted run's, but for files that
    ``leftover(relative path)`` accepts (complete, superseded ones a resume may leave)."""
    clean = tmp_path / "clean"
    with stepping(clean) as counted:
        want = run(clean)
    versions = counted.versions
    want_files = _files(clean)
    for i in range(counted.calls):
        root = tmp_path / f"crash{i}"
        crash_then_check(root, run, i, versions)
        got = run(root)  # the resume, with nothing patched
        assert_same(got, want, i)
        temps = [str(p.relative_to(root)) for p in root.rglob("*") if durable.is_temp(p)]
        assert all(leftover(k) for k in temps), (i, temps)  # never read, but litter
        got_files = _files(root)
        assert {k: got_files.get(k) for k in want_files} == want_files, i
        extra = sorted(set(got_files) - set(want_files) - set(temps))
        assert all(leftover(k) for k in extra), (i, extra)
    return counted.calls


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], i: int) -> None:
    assert sorted(got) == sorted(want), i
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (i, k)


# ----------------------------------------------------------------------------- (a) the measurement pass
FP = {"config": "c" * 64, "tokens": "t" * 64, "model_a": "a" * 64, "model_b": "b" * 64, "world_size": "1"}
N, BATCHES, EVERY = 6, 6, 2


def _batch(b: int) -> torch.Tensor:
    return torch.randn(40, N, generator=torch.Generator().manual_seed(b), dtype=torch.float64)


def measurement_pass(folder: Path) -> dict[str, torch.Tensor]:
    """A pass over BATCHES batches into two accumulators, checkpointed every EVERY batches
    through :class:`MeasureCheckpoint` and resumed from its checkpoint; returns the final state."""
    stats, coact = sa.ActivationStats(N, threshold=0.3), sa.CoActivation(N, threshold=0.3)
    with MeasureCheckpoint.open(folder, FP, rank=0, world=1, resume=True) as ck:
        saved = ck.load_state()
        start = 0
        if saved is not None:
            tensors, meta = saved
            stats.load_state_dict(unprefixed("stats", tensors))
            coact.load_state_dict(unprefixed("coact", tensors))
            start = meta["next_batch"]
        for b in range(start, BATCHES):
            stats.update(_batch(b))
            coact.update(_batch(b))
            if (b + 1) % EVERY == 0:
                state = {**prefixed("stats", stats.state_dict()), **prefixed("coact", coact.state_dict())}
                ck.save_state(state, {"next_batch": b + 1})
    return {**prefixed("stats", stats.state_dict()), **prefixed("coact", coact.state_dict())}


def test_a_crash_at_any_step_of_the_measurement_checkpoint_resumes_to_the_same_state(tmp_path):
    steps = every_crash_point(tmp_path, measurement_pass)
    # the lock's two writes, the fingerprint's and three state files' steps (six or seven each)
    assert steps >= 2 + 4 * 6, steps


# ----------------------------------------------------------------------------- (b) the SAE trainer
SAE_TOKENS = 3 * 128


def _activations() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(24, 8, generator=g), dim=1)
    return [((torch.rand(128, 24, generator=g) < 0.1) * torch.rand(128, 24, generator=g)) @ dirs + 0.2
            for _ in range(3)]  # fmt: skip


def sae_training(folder: Path) -> dict[str, torch.Tensor]:
    cfg = TopKTrainConfig(batch_size=64, log_every=2, checkpoint_every=128, dead_after_tokens=128,
                          resample_after_tokens=256)  # fmt: skip
    result = train_topk_sae(_activations(), None, 32, 2, SAE_TOKENS, config=cfg, checkpoint_dir=folder, progress=False)
    sae = result.dictionary
    return {name: getattr(sae, name).detach().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}


def test_a_crash_at_any_step_of_the_sae_checkpoint_resumes_to_the_same_weights(tmp_path):
    steps = every_crash_point(tmp_path, sae_training)
    assert steps >= 3 * 5 * 6, steps  # three checkpoints of five files, six steps or more each
