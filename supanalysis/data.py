"""Token sources: fixed-length sequences of token ids in a deterministic order.

A :class:`TokenSequences` cuts one flat token stream (a memory-mapped ``.npy``/``.bin``
file, or text encoded as bytes or with a local Hugging Face tokenizer) into consecutive,
non-overlapping sequences of ``seq_len`` tokens and yields (batch, seq_len) int64 batches.
Its ``keep_mask`` tells :class:`supanalysis.capture.ActivationSource` which positions to
drop (BOS, pad, the first position).
"""

from __future__ import annotations

import numbers
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: Token id dtypes a ``.bin`` file may hold (nanoGPT writes uint16).
TOKEN_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "int32": np.int32}
BYTE_VOCAB = 256


def open_tokens(path: str | Path, dtype: str | None = None) -> np.ndarray:
    """Memory-map a flat token file without reading it.

    Args:
        path: ``.npy`` (dtype from its header) or a raw ``.bin``/other file of ``dtype``.
        dtype: required for raw files (``"uint16"`` or ``"uint32"`` usually); for ``.npy``
            it is checked against the header when given.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} does not exist")
    # numpy's errors for a bad file (EOFError for an empty .npy, "mmap length is greater than
    # file size" for a truncated one, "cannot mmap an empty file") do not name the file.
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:
            raise ValueError(f"{path} is not a readable .npy token file: {exc}") from exc
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"{path} is not a .npy array file")
        try:
            want = None if dtype is None else np.dtype(TOKEN_DTYPES.get(dtype, dtype))
        except TypeError as exc:
            raise ValueError(f"dtype={dtype!r} is not a numpy dtype") from exc
        if want is not None and arr.dtype != want:
            raise ValueError(f"{path} holds {arr.dtype}, dtype={dtype!r} was requested")
    else:
        if dtype not in TOKEN_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(TOKEN_DTYPES)} for a raw token file, got {dtype!r}")
        if path.stat().st_size == 0:
            raise ValueError(f"{path} holds no tokens")  # np.memmap's own error does not name it
        try:
            arr = np.memmap(path, dtype=TOKEN_DTYPES[dtype], mode="r")
        except (ValueError, OSError) as exc:
            raise ValueError(f"{path} is not a readable {dtype} token file: {exc}") from exc
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{path} holds no tokens")
    if arr.dtype.kind not in "ui":
        raise ValueError(f"{path} holds {arr.dtype}; token ids must be integers")
    return arr


@dataclass
class TokenSequences:
    """Consecutive fixed-length sequences of a flat token array, batched.

    Attributes:
        tokens: flat token ids, any integer dtype (a ``np.memmap`` stays on disk; only
            the current batch is read).
        seq_len: tokens per sequence; the tail shorter than a sequence is dropped.
        batch_size: sequences per batch (the last batch may be smaller).
        skip_ids: token ids whose positions ``keep_mask`` rejects (e.g. BOS, pad).
        skip_first: also reject position 0 of every sequence (attention sinks).
        start: index of the first sequence (to resume a run).
        max_sequences: stop after this many sequences (``None``: the whole array).
        prepend: token id put in front of every sequence (e.g. BOS); it takes one of
            the ``seq_len`` slots, so each sequence reads ``seq_len - 1`` tokens.
        vocab_size: when given, every batch is checked to hold ids in ``[0, vocab_size)``
            (negative ids are always refused), so a bad id raises a ValueError naming its
            position instead of an IndexError deep inside the model's embedding.
    """

    tokens: np.ndarray
    seq_len: int
    batch_size: int = 8
    skip_ids: Sequence[int] = ()
    skip_first: bool = False
    start: int = 0
    max_sequences: int | None = None
    prepend: int | None = None
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        # Types first: a float or str here used to fail later inside range() or a comparison.
        for name in ("seq_len", "batch_size", "start", "max_sequences", "prepend", "vocab_size"):
            v = getattr(self, name)
            optional = name in ("max_sequences", "prepend", "vocab_size")
            if optional and v is None:
                continue
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative int{' or None' if optional else ''}, got {v!r}")
            setattr(self, name, int(v))
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        if self.prepend is not None and self.vocab_size is not None and self.prepend >= self.vocab_size:
            raise ValueError(f"prepend={self.prepend} is not below vocab_size={self.vocab_size}")
        if self.seq_len < 1 + (self.prepend is not None):
            raise ValueError(f"seq_len={self.seq_len} is too short")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        # np.asarray keeps a memmap's pages on disk; torch tensors and lists also work.
        self.tokens = np.asarray(self.tokens).reshape(-1)
        if self.tokens.dtype.kind not in "ui":
            raise ValueError(f"tokens must hold integers, got dtype {self.tokens.dtype}")

    @property
    def _stride(self) -> int:
        return self.seq_len - (self.prepend is not None)

    def __len__(self) -> int:
        """Number of sequences this source yields."""
        n = max(len(self.tokens) // self._stride - self.start, 0)
        return n if self.max_sequences is None else min(n, self.max_sequences)

    @property
    def n_tokens(self) -> int:
        """Tokens per pass (before ``keep_mask``)."""
        return len(self) * self.seq_len

    def __iter__(self) -> Iterator[Tensor]:
        stride, n = self._stride, len(self)
        for first in range(0, n, self.batch_size):
            count = min(self.batch_size, n - first)
            lo = (self.start + first) * stride
            # Copy only this batch out of the memory map, widened for nn.Embedding.
            raw = np.asarray(self.tokens[lo : lo + count * stride])
            self._check_ids(raw, lo)
            chunk = raw.astype(np.int64)
            ids = torch.from_numpy(chunk.reshape(count, stride))
            if self.prepend is not None:
                ids = torch.cat([torch.full((count, 1), self.prepend, dtype=torch.int64), ids], 1)
            yield ids

    def _check_ids(self, raw: np.ndarray, offset: int) -> None:
        """Refuse negative ids (and ids >= vocab_size) before they reach an embedding, which
        would raise IndexError or, on a GPU, a device-side assert. Checked on the raw dtype,
        so a uint64 id above 2^63 cannot wrap to a negative int64 unnoticed."""
        if raw.size == 0:
            return
        lo, hi = int(raw.min()), int(raw.max())
        limit = self.vocab_size if self.vocab_size is not None else np.iinfo(np.int64).max + 1
        if lo < 0 or hi >= limit:
            bad = lo if lo < 0 else hi
            where = offset + int(np.flatnonzero(raw == bad)[0])
            bound = f"[0, {self.vocab_size})" if self.vocab_size is not None else "[0, 2^63)"
            raise ValueError(f"token id {bad} at position {where} of the token stream is outside {bound}")

    def keep_mask(self, ids: Tensor) -> Tensor:
        """(batch, seq) bool: False where the position is skipped (skip_ids, skip_first)."""
        keep = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        if self.skip_ids:
            skip = torch.as_tensor(list(self.skip_ids), dtype=ids.dtype, device=ids.device)
            keep &= ~torch.isin(ids, skip)
        if self.skip_first:
            keep[:, 0] = False
        return keep


def encode_bytes(texts: Iterable[str | bytes], separator: bytes = b"\n") -> np.ndarray:
    """Bytes-as-tokens (vocab 256): UTF-8 bytes of every text joined by ``separator``."""
    parts = [t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in texts]
    return np.frombuffer(separator.join(parts), dtype=np.uint8).copy()


def load_tokenizer(folder: str | Path):
    """A Hugging Face tokenizer from a local folder (``local_files_only=True``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist (nothing is downloaded)")
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ImportError("a Hugging Face tokenizer needs: pip install 'supanalysis[hf]'") from err
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def encode_texts(texts: Iterable[str], tokenizer, separator_id: int | None = None) -> np.ndarray:
    """Token ids of every text through a Hugging Face ``tokenizer``, joined by ``separator_id``
    (default: the tokenizer's EOS id when it has one); uint32 when the vocabulary needs it."""
    if separator_id is None:
        separator_id = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i and separator_id is not None:
            ids.append(separator_id)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    return np.asarray(ids, dtype=dtype)


def text_tokens(paths: str | Path | Sequence[str | Path], tokenizer: str | Path | None = None) -> np.ndarray:
    """Read text files (in the given order) and encode them into one flat token array.

    Args:
        paths: one file or a list of files.
        tokenizer: ``None`` for bytes-as-tokens (vocab 256, what :class:`TinyTransformer`
            trains on), or a local folder holding a Hugging Face tokenizer.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if tokenizer is None:
        return encode_bytes(Path(p).read_bytes() for p in paths)
    tok = load_tokenizer(tokenizer)
    return encode_texts((Path(p).read_text(encoding="utf-8", errors="replace") for p in paths), tok)


def stdlib_source_files() -> list[Path]:
    """The Python standard library's own ``.py`` files, sorted (present on every machine).
    Third-party packages under site-/dist-packages are excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so third-party trees are never walked.
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(max_bytes: int | None = None) -> np.ndarray:
    """Bytes-as-tokens corpus (uint8, vocab 256) of the standard library's ``.py`` sources,
    in sorted path order, files joined by a newline; truncated to ``max_bytes``."""
    out, total = [], 0
    for path in stdlib_source_files():
        data = path.read_bytes() + b"\n"
        out.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    if not out:
        raise RuntimeError(f"no .py files under {sysconfig.get_paths()['stdlib']} ({sys.version})")
    corpus = np.frombuffer(b"".join(out), dtype=np.uint8)
    return corpus[:max_bytes].copy() if max_bytes is not None else corpus.copy()
