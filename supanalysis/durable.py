"""The one way supanalysis writes a file: durably, atomically, with a clear error.

Every file the library writes (reports, accumulator states, SAE checkpoints, trainer state,
fingerprints, dispatch tables) goes through :func:`durable_write`: the bytes go to a temp file
in the destination folder, which is flushed and fsynced, renamed over the destination, and the
folder itself is fsynced so the rename survives a power cut. A crash at any instant leaves
either the old file or the new one, never a torn one; a failure (disk full, permission denied,
read-only folder) removes the temp file and raises :class:`WriteError` naming the path.

Temp files are named ``.<name>.tmp-<random>``; :func:`remove_stale_temps` clears those a
killed writer left behind (a reader never mistakes one for a finished file).

A JSON file can vouch for itself: :func:`with_checksum` adds the sha256 of its canonical body,
:func:`checked_body` verifies it on read. :class:`FolderLock` keeps two writers out of one
folder with an advisory lock the kernel drops when its holder dies.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import socket
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None  # type: ignore[assignment]

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
        if is_temp(p):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def is_temp(path: Path) -> bool:
    """Whether ``path`` is a temp file of :func:`durable_write` (never a finished file)."""
    return path.name.startswith(".") and TEMP_MARK in path.name and path.is_file()


CHECKSUM_KEY = "checksum"


def body_checksum(body: Mapping[str, Any]) -> str:
    """sha256 of ``body`` as canonical JSON (sorted keys, no spaces): unchanged by re-indenting
    the file, changed by any edit to a key or value."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def with_checksum(body: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` plus a ``checksum`` field over the rest of it (see :func:`checked_body`)."""
    if CHECKSUM_KEY in body:
        raise ValueError(f"a checksummed JSON body cannot carry its own {CHECKSUM_KEY!r} field")
    return {**body, CHECKSUM_KEY: body_checksum(body)}


class ChecksumMismatch(ValueError):
    """A checksummed JSON file whose body no longer matches its checksum."""


def checked_body(doc: Mapping[str, Any], path: str | os.PathLike) -> tuple[dict[str, Any], bool]:
    """(the body of ``doc`` without its checksum, whether it carried one).

    Raises :class:`ChecksumMismatch` (a ValueError) naming ``path`` when the checksum does
    not match the body. A document
    without a checksum is returned as it is: whether to trust it is the caller's decision.
    """
    body = {k: v for k, v in doc.items() if k != CHECKSUM_KEY}
    if CHECKSUM_KEY not in doc:
        return body, False
    if doc[CHECKSUM_KEY] != body_checksum(body):
        raise ChecksumMismatch(f"{path} fails its checksum: the file was altered or corrupted after it was written")
    return body, True


def read_checked_json(path: str | os.PathLike) -> tuple[dict[str, Any], bool]:
    """:func:`checked_body` of the JSON object in the file ``path``.

    Raises ValueError naming ``path`` when the file is not UTF-8 JSON, holds something
    other than an object, or fails its checksum (:class:`ChecksumMismatch`); OSError when it cannot be read.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: holds a JSON {type(doc).__name__}, not an object")
    return checked_body(doc, path)


LOCK_FILE = "lock"


class FolderLocked(OSError):
    """Another process holds the folder's lock; ``holder`` is what it wrote there (pid, host)."""

    def __init__(self, folder: Path, holder: str) -> None:
        super().__init__(errno.EWOULDBLOCK, f"{folder} is locked by {holder or 'another process'}")
        self.folder, self.holder = folder, holder


class FolderLock:
    """An exclusive, non-blocking advisory lock (``flock``) on ``<folder>/lock``, held until
    :meth:`release` (or until the process dies: the kernel drops it, so a lock file left by a
    killed process never blocks the next one).

    The lock file is the one file not written through :func:`durable_write`: a rename would put
    a new inode under the name while the old one stays locked, letting two holders in. It is
    never deleted for the same reason; it holds only the holder's pid and host, for the
    message another process gets. On a filesystem without locks (or off POSIX) nothing is
    locked and :attr:`held` is False.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.held = False
        self._fd: int | None = None
        if fcntl is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise WriteError(exc.errno, f"cannot write {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderLocked(self.folder, holder) from None
            if exc.errno in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                return  # the filesystem has no locks: carry on unlocked rather than refuse
            raise
        self._fd, self.held = fd, True
        self._closer = weakref.finalize(self, os.close, fd)  # a dropped lock object still unlocks
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # the holder's name only serves messages (a full disk must not fail the run)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Drop the lock (closing its file); safe to call more than once."""
        if self._fd is not None:
            self._fd, self.held = None, False
            self._closer()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
