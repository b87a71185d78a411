"""The one way supanalysis writes a file: durably, atomically, with a clear error.

Every file the library writes (reports, accumulator states, SAE checkpoints, trainer state,
fingerprints, dispatch tables) goes through :func:`durable_write`: the bytes go to a temp file
in the destination folder, which is flushed and fsynced, renamed over the destination, and the
folder itself is fsynced so the rename survives a power cut. A crash at any instant leaves
either the old file or the new one, never a torn one; a failure (disk full, permission denied,
read-only folder) removes the temp file and raises :class:`WriteError` naming the path.

Temp files are named ``.<name>.tmp-<random>``; :func:`remove_stale_temps` clears those a
killed writer left behind (a reader never mistakes one for a finished file).
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path

TEMP_MARK = ".tmp-"


class WriteError(OSError):
    """A file could not be written; nothing half-written was left under its name."""


def _fsync_folder(folder: str) -> None:
    # Directory fsync makes the rename itself durable; some filesystems refuse it (EINVAL).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def temp_path_for(path: str | os.PathLike) -> str:
    """A fresh temp-file name beside ``path`` (same folder, so the rename is atomic)."""
    p = Path(path)
    return str(p.parent / f".{p.name}{TEMP_MARK}{secrets.token_hex(6)}")


def durable_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` fills a temp file beside ``path``; it is then fsynced and renamed over ``path``.

    The file gets the umask's usual permissions (safetensors alone would write 0600). On any
    failure the temp file is removed, ``path`` keeps its old content (or stays absent) and a
    :class:`WriteError` names ``path`` and the reason.
    """
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb"):  # created here, so its mode is the umask's
            pass
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_folder(str(path.parent))
    except BaseException as exc:
        if os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
        if isinstance(exc, (KeyboardInterrupt, SystemExit, WriteError)) or not _is_io_failure(exc):
            raise
        raise WriteError(errno.EIO, f"cannot write {path}: {exc}") from exc
    return path


def _is_io_failure(exc: BaseException) -> bool:
    # safetensors reports a full disk as its own SafetensorError wrapping an I/O message.
    text = str(exc).lower()
    return type(exc).__name__ == "SafetensorError" and any(
        w in text for w in ("no space", "i/o", "io error", "permission", "read-only", "os error")
    )


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Durably write UTF-8 text to ``path``."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return durable_write(path, write)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Durably write bytes to ``path``."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return durable_write(path, write)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temp files a killed writer left in ``folder`` (not recursive); return them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = []
    for p in folder.iterdir():
        if p.is_file() and p.name.startswith(".") and TEMP_MARK in p.name:
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone
