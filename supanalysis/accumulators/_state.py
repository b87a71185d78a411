"""What the three streaming accumulators share: device adoption, Chan merges, file I/O, all-reduce.

Every accumulator keeps its state as named float64/int64 tensors on one device. Files are
safetensors (tensors) plus JSON metadata (kind, version, configuration); loading never
unpickles anything and refuses a file of another kind or shape.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from collections.abc import Callable, Mapping

import torch

from ..durable import durable_write

FORMAT_VERSION = "1"


def is_int(v: object) -> bool:
    # bool is an int subclass: True must not pass for a feature count read from a file.
    return isinstance(v, int) and not isinstance(v, bool)


def check_threshold(threshold: object, where: str) -> float:
    """A real, non-NaN firing threshold (NaN would make every comparison false: nothing fires)."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or threshold != threshold:
        raise ValueError(f"{where}: threshold must be a real number (not NaN), got {threshold!r}")
    return float(threshold)


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


def load_file_checked(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read tensors + metadata written by :func:`atomic_save`; refuse another kind or version."""
    from safetensors import safe_open

    path = os.fspath(path)
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
    want = meta.pop("sha256", None)
    if want is not None and want != _digest(tensors, meta):
        raise ValueError(f"{path}: checksum mismatch: the file was altered or corrupted after it was written")
    if meta.get("kind") != kind:
        raise ValueError(f"{path} holds a {meta.get('kind')!r}, not a {kind!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta.get('version')!r}; this library reads {FORMAT_VERSION!r}")
    return tensors, meta


def check_state(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]], where: str
) -> None:
    """Every expected tensor present with the expected shape and dtype; nothing else."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{where}: state mismatch (missing {missing}, unexpected {extra})")
    for k, (shape, dtype) in expected.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise ValueError(f"{where}: {k} must be {dtype} of shape {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")


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
