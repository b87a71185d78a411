"""Checkpoint and resume of the test's measurement pass: SIGKILL mid-pass, resume, same report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from pair_config import pair_config
from safetensors import safe_open

from supanalysis.cli import main
from supanalysis.config import ModelSpec, SAETraining, TestConfig
from supanalysis.experiment import CheckpointMismatch, analyse, measure, measuring
from supanalysis.experiment.state import CheckpointInUse
from supanalysis.models import TinyConfig, TinyTransformer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(1)
    np.save(root / "tokens.npy", rng.integers(0, 64, size=260_000).astype(np.uint16))
    for name, (L, d, seed) in {"A": (1, 16, 0), "B": (2, 8, 1)}.items():
        torch.manual_seed(seed)
        cfg = TinyConfig(n_layers=L, d_model=d, n_heads=2, d_ff=4 * d, vocab_size=64, n_ctx=32)
        TinyTransformer(cfg).save(root / name)
    return root


def config(root, **kw) -> TestConfig:
    return pair_config(root, **{"stats_tokens": 3000, "bootstrap": 50, **kw})


def _without_time(report: dict) -> dict:
    """The report without what depends on when and how fast it ran: its creation time, its
    timings, and report.json's checksum (which covers both)."""
    return {k: v for k, v in report.items() if k not in ("created", "timings", "checksum")}


def _next_batch(path) -> int:
    with safe_open(str(path), framework="pt") as fh:
        return int(json.loads(fh.metadata()["supanalysis"])["next_batch"])


def test_interrupted_then_resumed_equals_uninterrupted(workspace, tmp_path, monkeypatch):
    cfg = config(workspace)
    want, _ = analyse(measure(cfg, progress=False))
    ck = tmp_path / "ck"
    real, calls = measuring.site_updates, [0]

    def failing(*args):
        calls[0] += 1
        if calls[0] == 13:  # mid-pass, between two checkpoints
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(measuring, "site_updates", failing)
    with pytest.raises(KeyboardInterrupt):
        measure(cfg, progress=False, checkpoint_dir=ck, checkpoint_every_tokens=1000)
    monkeypatch.setattr(measuring, "site_updates", real)
    assert 0 < _next_batch(ck / "measure.rank0.safetensors") < 6
    resumed, _ = analyse(measure(cfg, progress=False, checkpoint_dir=ck, resume=True))
    assert _without_time(resumed) == _without_time(want)
    # Resuming the finished state redoes only the analysis.
    again, _ = analyse(measure(cfg, progress=False, checkpoint_dir=ck, resume=True))
    assert _without_time(again) == _without_time(want)
    # Without resume=True an existing checkpoint of this run is refused, not overwritten.
    with pytest.raises(CheckpointMismatch, match="resume"):
        measure(cfg, progress=False, checkpoint_dir=ck)


def test_checkpoint_of_another_run_is_refused(workspace, tmp_path):
    ck = tmp_path / "ck"
    measure(config(workspace), progress=False, checkpoint_dir=ck)
    with pytest.raises(CheckpointMismatch, match="measurement settings"):
        measure(config(workspace, seed=1), progress=False, checkpoint_dir=ck, resume=True)
    other = config(workspace, model_b=ModelSpec(path=str(workspace / "A"), name="B"))
    with pytest.raises(CheckpointMismatch, match="model B's weights"):
        measure(other, progress=False, checkpoint_dir=ck, resume=True)
    # Analysis-only settings (thresholds, bootstrap) may change between the two runs.
    measure(config(workspace, bootstrap=10), progress=False, checkpoint_dir=ck, resume=True)
    # A folder with foreign files is never written into.
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointMismatch, match="not empty"):
        measure(config(workspace), progress=False, checkpoint_dir=junk)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage_fingerprint", "flipped_fingerprint"])
def test_corrupted_checkpoint_is_refused(workspace, tmp_path, damage):
    ck = tmp_path / "ck"
    measure(config(workspace), progress=False, checkpoint_dir=ck)
    state = ck / "measure.rank0.safetensors"
    if damage == "truncate":
        data = state.read_bytes()
        state.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray(state.read_bytes())
        data[10] ^= 0xFF  # inside the header's JSON
        state.write_bytes(bytes(data))
    elif damage == "garbage_fingerprint":
        (ck / "fingerprint.json").write_text("{not json")
    else:  # one hex digit of a hash: still JSON, still looks like a fingerprint; its checksum says no
        fp = ck / "fingerprint.json"
        digest = json.loads(fp.read_text())["tokens"]
        fp.write_text(fp.read_text().replace(digest, digest[:-1] + ("0" if digest[-1] != "0" else "1")))
    with pytest.raises(CheckpointMismatch, match=r"corrupt|unreadable|another run"):
        measure(config(workspace), progress=False, checkpoint_dir=ck, resume=True)
    # The CLI reports it in one line and writes no report.
    out = tmp_path / "out"
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(config(workspace).to_dict()))
    rc = main(["test", "--config", str(cfg_path), "--out", str(out), "--no-progress",
               "--checkpoint-dir", str(ck), "--resume"])  # fmt: skip
    assert rc == 2 and not out.exists()


def test_sigkill_mid_pass_then_resume_gives_the_same_report(workspace, tmp_path):
    cfg = config(workspace, stats_tokens=240_000, match_tokens=20_000)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    ck, out = tmp_path / "ck", tmp_path / "out"
    cmd = [sys.executable, "-m", "supanalysis.cli", "test", "--config", str(cfg_path), "--out", str(out),
           "--no-progress", "--checkpoint-dir", str(ck), "--checkpoint-every", "2048"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = ck / "measure.rank0.safetensors"
    deadline = time.monotonic() + 300
    killed_at, refused = None, None
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and refused is None:
            # A second run on the folder while the first is alive is refused at once, naming both.
            with pytest.raises(CheckpointInUse) as refused:
                measure(cfg, progress=False, checkpoint_dir=ck, resume=True)
            assert str(ck) in str(refused.value) and f"pid {proc.pid} " in str(refused.value)
        if state.is_file():
            try:
                nb = _next_batch(state)
            except Exception:  # the rename is atomic, but be tolerant of a partial read
                nb = 0
            if nb >= 16:
                proc.send_signal(signal.SIGKILL)
                killed_at = nb
                break
        time.sleep(0.01)
    proc.wait(timeout=60)
    log = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, log
    assert refused is not None, "the second run was never tried"
    assert not out.exists(), "a killed run must not leave a report behind"
    total_batches = -(-240_000 // (8 * 32))
    assert _next_batch(state) < total_batches, "the run finished before it was killed; the test proves nothing"

    assert main([*cmd[3:], "--resume"]) == 0
    resumed = json.loads((out / "report.json").read_text())
    assert _next_batch(state) == total_batches
    whole = tmp_path / "whole"
    assert main(["test", "--config", str(cfg_path), "--out", str(whole), "--no-progress"]) == 0
    uninterrupted = json.loads((whole / "report.json").read_text())
    assert _without_time(resumed) == _without_time(uninterrupted)


def test_fingerprint_of_a_field_added_later_keeps_older_checkpoints_valid():
    """match_precision joined TestConfig after checkpoints existed: at its default ("ieee") it
    is left out of the run fingerprint (older checkpoints, written without it, still resume);
    any other value changes the fingerprint (a bf16 run never resumes an ieee one)."""
    import hashlib

    from supanalysis.experiment.state import ANALYSIS_ONLY, run_fingerprint

    cfg = TestConfig(tokens="t.npy")
    tokens = np.arange(100, dtype=np.uint16)
    models = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)]
    old = {k: v for k, v in cfg.to_dict().items() if k not in (*ANALYSIS_ONLY, "match_precision", "models")}
    for side in ("model_a", "model_b"):  # shape and seed joined ModelSpec later, as labels
        old[side] = {k: v for k, v in old[side].items() if k not in ("shape", "seed")}
    old["sae"] = {k: v for k, v in old["sae"].items() if k != "seed_ceiling"}  # joined SAETraining later
    old_hash = hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()
    assert run_fingerprint(cfg, tokens, models, 1)["config"] == old_hash
    bf16 = TestConfig(tokens="t.npy", match_precision="bf16")
    assert run_fingerprint(bf16, tokens, models, 1)["config"] != old_hash
    labelled = TestConfig(tokens="t.npy", model_a=ModelSpec(shape="wide"))
    assert run_fingerprint(labelled, tokens, models, 1)["config"] != old_hash
    ceiling = TestConfig(tokens="t.npy", sae=SAETraining(seed_ceiling=True))
    assert run_fingerprint(ceiling, tokens, models, 1)["config"] != old_hash
