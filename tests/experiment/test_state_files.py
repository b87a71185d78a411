"""The checkpoint's own files: the token hash covers every token; a killed write leaves no trap."""

from __future__ import annotations

import numpy as np
import pytest

from supanalysis.durable import TEMP_MARK
from supanalysis.experiment.state import (
    FINGERPRINT_FILE,
    TOKEN_HASH_CHUNK,
    CheckpointMismatch,
    MeasureCheckpoint,
    token_file_hash,
)


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
    assert sorted(p.name for p in ck_dir.iterdir()) == [FINGERPRINT_FILE]
    assert ck.fingerprint == {"run": "x"}


def test_a_folder_with_real_files_and_no_fingerprint_is_still_refused(tmp_path):
    ck_dir = tmp_path / "ck"
    ck_dir.mkdir()
    (ck_dir / "notes.txt").write_text("someone else's")
    with pytest.raises(CheckpointMismatch, match="not empty"):
        MeasureCheckpoint.open(ck_dir, {"run": "x"}, rank=0, world=1, resume=False)
