"""The checkpoint's own files: the token hash covers every token; a killed write leaves no trap;
the folder's lock keeps a second run out; the fingerprint vouches for itself."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from supanalysis.config import TestConfig
from supanalysis.distributed import leave_process_group
from supanalysis.durable import LOCK_FILE, TEMP_MARK
from supanalysis.experiment.state import (
    FINGERPRINT_FILE,
    TOKEN_HASH_CHUNK,
    CheckpointInUse,
    CheckpointMismatch,
    MeasureCheckpoint,
    open_checkpoint,
    releases_checkpoints,
    token_file_hash,
)

FP = {"config": "c" * 64, "tokens": "t" * 64, "world_size": "1"}


@contextlib.contextmanager
def _held_by_child(folder):
    """A child process holding ``folder``'s lock until it is SIGKILLed on exit; yields its pid."""
    code = (
        "import sys, time; from supanalysis.durable import FolderLock\n"
        "lock = FolderLock(sys.argv[1]); print(1, flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"1\n"
        yield child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)


def _open(folder, rank=0, resume=True, join=False, fp=FP) -> MeasureCheckpoint:
    return MeasureCheckpoint.open(folder, fp, rank=rank, world=2, resume=resume, join=join)


def test_a_same_size_edit_in_the_middle_changes_the_token_hash(monkeypatch):
    monkeypatch.setattr("supanalysis.experiment.state.TOKEN_HASH_CHUNK", 1 << 12)  # several chunks
    tokens = np.arange(3 << 20, dtype=np.uint16) % 50_000  # 6 MiB: beyond a first and last MiB
    edited = tokens.copy()
    edited[len(tokens) // 2] += 1
    assert token_file_hash("t.npy", tokens) == token_file_hash("t.npy", tokens.copy())
    assert token_file_hash("t.npy", tokens) != token_file_hash("t.npy", edited)
    assert token_file_hash("t.npy", tokens) != token_file_hash("t.npy", tokens.astype(np.uint32))
    assert TOKEN_HASH_CHUNK >= 1 << 20


def test_a_folder_holding_only_a_killed_writers_temp_file_opens(tmp_path):
    ck_dir = tmp_path / "ck"
    ck_dir.mkdir()
    (ck_dir / f".{FINGERPRINT_FILE}{TEMP_MARK}0123ab").write_text('{"half": ')
    ck = MeasureCheckpoint.open(ck_dir, {"run": "x"}, rank=0, world=1, resume=False)
    assert sorted(p.name for p in ck_dir.iterdir()) == [FINGERPRINT_FILE, LOCK_FILE]
    assert ck.fingerprint == {"run": "x"}
    ck.close()


def test_a_folder_with_real_files_and_no_fingerprint_is_still_refused(tmp_path):
    ck_dir = tmp_path / "ck"
    ck_dir.mkdir()
    (ck_dir / "notes.txt").write_text("someone else's")
    with pytest.raises(CheckpointMismatch, match="not empty"):
        MeasureCheckpoint.open(ck_dir, {"run": "x"}, rank=0, world=1, resume=False)
    assert [p.name for p in ck_dir.iterdir()] == ["notes.txt"]  # no lock file left in it either


def test_a_second_open_of_a_held_folder_is_refused_until_the_first_closes(tmp_path):
    first = _open(tmp_path / "ck", resume=False)
    with pytest.raises(CheckpointInUse, match=re.escape(str(tmp_path / "ck")) + r".*in use.*pid \d+"):
        _open(tmp_path / "ck")
    joined = _open(tmp_path / "ck", rank=1, join=True)  # the run's own other ranks share the lock
    assert joined.fingerprint == FP
    first.close()
    first.close()  # idempotent
    with _open(tmp_path / "ck") as again:
        assert again.fingerprint == FP
    _open(tmp_path / "ck").close()  # the with-block released it


def test_a_live_process_holds_the_folder_and_its_kill_frees_it(tmp_path):
    """Another process's lock refuses this one with that process's pid; SIGKILL leaves the lock
    file behind, and that stale file does not block the next run."""
    folder = tmp_path / "ck"
    _open(folder, resume=False).close()
    with _held_by_child(folder) as pid:
        with pytest.raises(CheckpointInUse, match=f"pid {pid} "):
            _open(folder)
    assert (folder / LOCK_FILE).is_file()
    _open(folder).close()


def test_a_refused_open_releases_the_lock_at_once(tmp_path):
    folder = tmp_path / "ck"
    _open(folder, resume=False).close()
    with pytest.raises(CheckpointMismatch, match="resume") as refused:
        _open(folder, resume=False)  # this run's folder, without resume
    with pytest.raises(CheckpointMismatch, match="another run") as other:
        _open(folder, fp={**FP, "tokens": "u" * 64})
    # The tracebacks (kept alive above) still reference the refused checkpoints: no lock with them.
    assert refused.value and other.value
    _open(folder).close()


def test_releases_checkpoints_frees_the_folder_when_the_run_raises(tmp_path):
    folder = tmp_path / "ck"

    @releases_checkpoints
    def run():
        ck = _open(folder, resume=False)
        assert ck.fingerprint == FP
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        run()
    assert info.traceback  # the frame holding ``ck`` is still alive; its lock is not
    _open(folder).close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "edit_checksum"])
def test_a_damaged_fingerprint_is_refused_naming_the_file(tmp_path, damage):
    folder = tmp_path / "ck"
    _open(folder, resume=False).close()
    path = folder / FINGERPRINT_FILE
    doc = json.loads(path.read_text())
    assert set(doc) == {*FP, "checksum"}
    text = path.read_text()
    if damage == "flip":
        text = text.replace('"' + "c" * 64, '"' + "c" * 63 + "d")  # still valid JSON, a wrong digest
    elif damage == "truncate":
        text = text[: len(text) // 2]
    else:
        text = text.replace(doc["checksum"], "0" * 64)
    path.write_text(text)
    with pytest.raises(CheckpointMismatch, match=re.escape(str(path)) + r".*(checksum|unreadable).*afresh"):
        _open(folder)
    with pytest.raises(CheckpointMismatch, match=re.escape(str(path))):
        _open(folder, rank=1, join=True)  # the other ranks read it the same way


def test_an_older_fingerprint_without_checksum_resumes_only_when_it_is_this_runs(tmp_path):
    """Written before fingerprints carried a checksum: every field must equal this run's (that
    comparison vouches for it), and it is rewritten with its checksum."""
    folder = tmp_path / "ck"
    folder.mkdir()
    path = folder / FINGERPRINT_FILE
    path.write_text(json.dumps(FP, indent=2, sort_keys=True) + "\n")
    with pytest.raises(CheckpointMismatch, match=r"another run.*config"):
        _open(folder, fp={**FP, "config": "d" * 64})
    assert "checksum" not in json.loads(path.read_text())
    _open(folder).close()
    assert json.loads(path.read_text())["checksum"]
    _open(folder).close()


def _tiny_run():
    """(config, tokens, models) of a run, enough for its fingerprint."""
    torch.manual_seed(0)
    return TestConfig(tokens="t.npy"), np.arange(100, dtype=np.uint16), [torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)]


def test_open_checkpoint_frees_the_folder_when_a_rank_refuses_its_state(tmp_path):
    """A corrupt state file is refused after rank 0 took the lock: the lock goes with the error."""
    cfg, tokens, models = _tiny_run()
    ck, saved = open_checkpoint(tmp_path, cfg, tokens, models, resume=False)
    assert saved is None
    ck.save_state({"x": torch.zeros(3)}, {"next_batch": 1})
    ck.close()
    ck.state_path.write_bytes(ck.state_path.read_bytes()[:-5])
    for _ in range(2):  # the second attempt meets the same refusal, not a held lock
        with pytest.raises(CheckpointMismatch, match="corrupt") as refused:
            open_checkpoint(tmp_path, cfg, tokens, models, resume=True)
        assert not isinstance(refused.value, CheckpointInUse)


def _rank_opens(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ck, saved = open_checkpoint(folder, *_tiny_run(), resume=False)
        assert saved is None
        ck.save_state({"x": torch.full((2,), float(rank))}, {"next_batch": 1})
        dist.barrier()
        if rank == 1:  # as another run's rank 0 would, while this run holds the folder
            with pytest.raises(CheckpointInUse) as refused:
                MeasureCheckpoint.open(folder, ck.fingerprint, rank=0, world=world, resume=True)
            with open(out, "w") as fh:
                fh.write(str(refused.value))
        dist.barrier()
        ck.close()
    finally:
        leave_process_group()


def test_the_ranks_of_one_run_share_the_folder_and_another_run_is_refused(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder, out = tmp_path / "ck", tmp_path / "refused.txt"
    mp.spawn(_rank_opens, args=(2, port, str(folder), str(out)), nprocs=2, join=True)
    assert sorted(p.name for p in folder.iterdir()) == [
        FINGERPRINT_FILE, LOCK_FILE, "measure.rank0.safetensors", "measure.rank1.safetensors"
    ]  # fmt: skip
    assert str(folder) in out.read_text() and "in use" in out.read_text()
