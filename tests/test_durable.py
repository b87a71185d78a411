"""The durable-write helper: all or nothing, a clear error naming the path, no stray temp files."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from supanalysis import durable
from supanalysis.durable import WriteError, durable_write, remove_stale_temps, write_bytes, write_text


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    write_text(p, "old")
    write_text(p, "new content")
    assert p.read_text() == "new content"
    assert _listing(tmp_path) == ["a.txt"]


def test_file_gets_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        p = write_bytes(tmp_path / "b.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644


def test_failure_mid_write_keeps_the_old_file_and_names_the_path(tmp_path):
    p = tmp_path / "c.json"
    write_text(p, "complete")

    def half_then_full_disk(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("{half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=r"cannot write .*c\.json.*No space left"):
        durable_write(p, half_then_full_disk)
    assert p.read_text() == "complete"
    assert _listing(tmp_path) == ["c.json"]


def test_permission_denied_is_one_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()

    # Root ignores directory permission bits, so refuse at the open the helper makes.
    def refusing_open(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(durable, "open", refusing_open, raising=False)
    with pytest.raises(WriteError, match=r"cannot write .*ro/d\.txt.*Permission denied"):
        write_text(folder / "d.txt", "x")
    monkeypatch.undo()
    assert _listing(folder) == []


def test_non_io_errors_pass_through_unchanged(tmp_path):
    def bad(tmp: str) -> None:
        raise ValueError("not serialisable")

    with pytest.raises(ValueError, match="not serialisable"):
        durable_write(tmp_path / "e", bad)
    assert _listing(tmp_path) == []


def test_stale_temps_are_found_and_removed(tmp_path):
    write_text(tmp_path / "keep.json", "{}")
    stale = tmp_path / f".keep.json{durable.TEMP_MARK}abc123"
    stale.write_text("{half")
    legacy = tmp_path / ".tmp-xyz.safetensors"  # the older helpers' temp names
    legacy.write_text("half")
    gone = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in gone) == sorted([stale.name, legacy.name])
    assert _listing(tmp_path) == ["keep.json"]
