"""What the streaming accumulators share below their base class: checks, Chan merges, file I/O.

Every accumulator keeps its state as named float64/int64 tensors on one device. Files are
safetensors (tensors) plus JSON metadata (kind, version, configuration, sha256 of it all);
loading never unpickles anything and refuses a file of another kind, shape or checksum.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from collections.abc import Callable, Mapping

import torch

from ..durable import durable_write

FORMAT_VERSION = "1"

#: state name -> (shape, dtype); ``None`` in a shape accepts any length there
Spec = dict[str, tuple[tuple[int | None, ...], torch.dtype]]


def is_int(v: object) -> bool:
    # bool is an int subclass: True must not pass for a feature count read from a file.
    return isinstance(v, int) and not isinstance(v, bool)


def _finite_real(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)


def check_threshold(threshold: object, where: str) -> float:
    """A finite real firing threshold.

    NaN makes every comparison false (nothing fires); +inf means nothing can fire and -inf
    that every finite value fires, zeros included: both are mistakes rather than requests,
    and a large finite value says either on purpose.
    """
    if not _finite_real(threshold):
        raise ValueError(f"{where}: threshold must be a finite real number, got {threshold!r}")
    return float(threshold)


def threshold_field(v: object, name: str) -> float:
    """Metadata parser for a firing threshold (see :func:`check_threshold`)."""
    if not _finite_real(v):
        raise ValueError(f"{name}={v!r} is not a finite real number")
    return float(v)  # type: ignore[arg-type]


def positive_int_field(v: object, name: str) -> int:
    """Metadata parser for a size: strict types, as int(4.7) or int(inf) would truncate or raise."""
    if not is_int(v) or v < 1:  # type: ignore[operator]
        raise ValueError(f"{name}={v!r} is not a positive int")
    return v  # type: ignore[return-value]


def check_top_k(k: object, n: int) -> int:
    """The number of partner slots for ``n`` features: k, clamped to the n - 1 other features
    (a larger k would allocate [n, k] of slots that can never hold a partner)."""
    if not is_int(k) or k < 1:  # type: ignore[operator]
        raise ValueError(f"k must be a positive int, got {k!r}")
    return min(k, n - 1)  # type: ignore[type-var]


def check_device(device: object, what: str, allow_meta: bool = False) -> torch.device:
    """A device for accumulator state or input: CUDA only when present, ``meta`` (no data) only
    for an (empty) state, never for an input.

    Checked before any state moves, so a bad device leaves an accumulator unchanged
    (a meta input used to be adopted as the state's device before the op failed).
    """
    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{what}={device!r} is not a torch device ({exc})") from None
    if dev.type == "meta" and not allow_meta:
        raise ValueError(f"{what} is on the meta device (no data); accumulators need real tensors")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what}={device!r} but CUDA is not available")
    return dev


def chan_merge(
    n_a: torch.Tensor | int,
    mean_a: torch.Tensor,
    m2_a: torch.Tensor,
    n_b: torch.Tensor | int,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (count, mean, centred M2) of two disjoint sets (Chan et al.), in float64.

    Counts may be per-feature tensors; where the merged count is 0 the result is (0, 0).
    """
    na = torch.as_tensor(n_a, dtype=torch.float64, device=mean_a.device)
    nb = torch.as_tensor(n_b, dtype=torch.float64, device=mean_a.device)
    n = na + nb
    safe = torch.where(n > 0, n, torch.ones_like(n))
    delta = mean_b - mean_a
    mean = torch.where(n > 0, mean_a + delta * (nb / safe), torch.zeros_like(mean_a))
    m2 = m2_a + m2_b + delta * delta * (na * nb / safe)
    return mean, m2


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> None:
    """``write(tmp)`` a temp file beside ``path``, then rename it over ``path`` (see :mod:`supanalysis.durable`)."""
    durable_write(path, write)


def atomic_save(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object], path: str | os.PathLike) -> None:
    """Write safetensors (with a sha256 of everything in the metadata) atomically to ``path``."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    full = {**dict(meta), "sha256": _digest(cpu, meta)}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata={"supanalysis": json.dumps(full)}), ".safetensors")


def _digest(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object]) -> str:
    """sha256 over the metadata (sorted JSON) and every tensor's name, dtype, shape and bytes:
    a flipped bit anywhere, even inside a float that still parses, is caught on load."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_file_checked(
    path: str | os.PathLike, kind: str, *, trusted: bool = False
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read tensors + metadata written by :func:`atomic_save`; refuse another kind or version,
    a checksum that does not match, and a file without a checksum unless ``trusted``."""
    path = os.fspath(path)
    tensors, meta = _read(path, kind)
    want = meta.pop("sha256", None)
    if want is not None and want != _digest(tensors, meta):
        raise ValueError(f"{path}: checksum mismatch: the file was altered or corrupted after it was written")
    if meta.get("kind") != kind:
        raise ValueError(f"{path} holds a {meta.get('kind')!r}, not a {kind!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta.get('version')!r}; this library reads {FORMAT_VERSION!r}")
    if want is None and not trusted:
        raise ValueError(
            f"{path} carries no sha256 checksum, so nothing vouches for its state; pass trusted=True to load it anyway"
        )
    return tensors, meta


def _read(path: str, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(path, framework="pt") as fh:
            raw = (fh.metadata() or {}).get("supanalysis")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    if raw is None:
        raise ValueError(f"{path} has no supanalysis metadata; it was not written by {kind}.save")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt supanalysis metadata: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: corrupt supanalysis metadata: not an object")
    return tensors, meta


def check_state(tensors: Mapping[str, torch.Tensor], expected: Spec, where: str) -> None:
    """Every expected tensor present with the expected shape and dtype; nothing else."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{where}: state mismatch (missing {missing}, unexpected {extra})")
    for k, (shape, dtype) in expected.items():
        t = tensors[k]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {k} must be a tensor, got {type(t).__name__}")
        fits = t.dim() == len(shape) and all(w is None or w == s for w, s in zip(shape, t.shape))
        if not fits or t.dtype != dtype:
            dims = ", ".join("any" if w is None else str(w) for w in shape)
            want = f"({dims},)" if len(shape) == 1 else f"({dims})"
            raise ValueError(f"{where}: {k} must be {dtype} of shape {want}, got {t.dtype} {tuple(t.shape)}")


def resolve_device(current: torch.device | None, *tensors: torch.Tensor) -> torch.device:
    """The accumulator's device: fixed at construction or adopted from the first input."""
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"inputs must be on one device, got {dev} and {t.device}")
    if current is not None and dev != current:
        raise ValueError(f"input is on {dev} but this accumulator's state is on {current}; move one of them")
    return dev


def dist_parallel_moments(
    n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, group=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-reduce (count, mean, M2) across ranks exactly, without raw-moment cancellation.

    Each rank shifts its M2 to the global mean: M2 = Σ_r [M2_r + n_r (μ_r − μ)^2], with
    μ = Σ_r n_r μ_r / N. Three sum-all-reduces, all in float64.
    """
    import torch.distributed as dist

    n_tot = n.to(torch.float64).clone()
    dist.all_reduce(n_tot, group=group)
    weighted = mean * n.to(torch.float64)
    dist.all_reduce(weighted, group=group)
    safe = torch.where(n_tot > 0, n_tot, torch.ones_like(n_tot))
    mu = torch.where(n_tot > 0, weighted / safe, torch.zeros_like(weighted))
    shifted = m2 + n.to(torch.float64) * (mean - mu) ** 2
    dist.all_reduce(shifted, group=group)
    return n_tot, mu, shifted
