"""Backend availability and selection, shared by every op.

Backends: ``reference`` (plain PyTorch, float64, any device), ``cpp`` (the C++ CPU kernels
of ``supanalysis._C``), ``triton`` (``supanalysis.kernels``; on a GPU, or on the CPU under
``TRITON_INTERPRET=1``) and ``cuda`` (the CUDA kernels of ``supanalysis._C``).

Choice: an explicit ``backend=`` argument wins, then the ``SUPANALYSIS_BACKEND`` environment
variable, then ``auto``. An explicitly requested backend that cannot run raises
:class:`BackendUnavailable`. ``auto`` takes the backend the benchmark measured fastest for
the op, device and dtype (:mod:`supanalysis.dispatch`) when there is such a measurement
and it can run here; otherwise the op's static preference for the device, and when it has
to fall back from that, it says so once per (op, device, backend) through ``logging``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from . import dispatch

log = logging.getLogger("supanalysis")

BACKENDS: tuple[str, ...] = ("reference", "cpp", "triton", "cuda")
NATIVE = "supanalysis._C"  # the compiled extension: C++ and CUDA launchers, for lazy()
_VALID_CHOICES = ("auto", *BACKENDS)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here (not built, no device, no Triton)."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run in this process, and why not when it cannot."""

    name: str
    available: bool
    devices: tuple[str, ...]
    reason: str
    variants: tuple[str, ...] = ()  # "op:variant" launchers of this backend (ops/registry.py)

    def __str__(self) -> str:
        where = ",".join(self.devices) if self.devices else "-"
        state = "available" if self.available else "unavailable"
        extra = f" variants={','.join(self.variants)}" if self.variants else ""
        return f"{self.name:<10} {state:<12} devices={where:<9} {self.reason}{extra}"


_native_error: str | None = None


@functools.cache
def native():
    """The compiled extension ``supanalysis._C``, or None when it failed to import."""
    global _native_error
    try:
        return importlib.import_module("supanalysis._C")
    except ImportError as exc:  # pragma: no cover - exercised only on broken installs
        _native_error = str(exc)
        log.warning("supanalysis._C failed to import (%s); only the reference backend is usable", exc)
        return None


def native_error() -> str | None:
    """Why ``supanalysis._C`` did not load (None when it did)."""
    native()
    return _native_error


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def backends() -> dict[str, BackendStatus]:
    """Every backend with whether it can run here, on which devices, why not, and the named
    variants of the registered ops it offers."""
    from .ops.registry import variant_names  # the registry imports this module

    named = variant_names()
    return {k: replace(v, variants=named.get(k, ())) for k, v in backend_status().items()}


def _status_key() -> tuple[str, str]:
    return (os.environ.get("TRITON_INTERPRET", "0"), os.environ.get("SUPANALYSIS_BACKEND", ""))


_status_cache: dict[tuple[str, str], dict[str, BackendStatus]] = {}


def cached_status() -> dict[str, BackendStatus]:
    """:func:`backend_status`, computed once per process and environment (TRITON_INTERPRET,
    SUPANALYSIS_BACKEND): ``resolve`` runs on every op call."""
    key = _status_key()
    if key not in _status_cache:
        _status_cache.clear()
        _status_cache[key] = backend_status()
    return _status_cache[key]


def backend_status() -> dict[str, BackendStatus]:
    """Availability of every backend, computed afresh; see :func:`backends`."""
    cuda_dev = torch.cuda.is_available()
    ext = native()
    out: dict[str, BackendStatus] = {
        "reference": BackendStatus(
            "reference", True, ("cpu", "cuda") if cuda_dev else ("cpu",), "plain PyTorch, float64"
        )
    }
    if ext is None:
        out["cpp"] = BackendStatus("cpp", False, (), f"supanalysis._C did not load: {native_error()}")
    else:
        omp = "OpenMP" if ext.with_openmp else "no OpenMP"
        out["cpp"] = BackendStatus("cpp", True, ("cpu",), f"C++ CPU kernels ({omp}, {torch.get_num_threads()} threads)")
    tv = _triton_version()
    if tv is None:
        out["triton"] = BackendStatus("triton", False, (), "triton is not installed (pip install triton)")
    else:
        devs = (("cuda",) if cuda_dev else ()) + (("cpu",) if triton_interpret() else ())
        why = f"triton {tv}"
        if triton_interpret():
            why += ", TRITON_INTERPRET=1 (CPU interpreter: correct, slow)"
        if not devs:
            why += "; no CUDA device and TRITON_INTERPRET is not 1"
        out["triton"] = BackendStatus("triton", bool(devs), devs, why)
    if ext is None:
        out["cuda"] = BackendStatus("cuda", False, (), "supanalysis._C did not load")
    elif not ext.with_cuda:
        out["cuda"] = BackendStatus("cuda", False, (), "supanalysis._C was built without CUDA kernels")
    elif not cuda_dev:
        out["cuda"] = BackendStatus("cuda", False, (), "CUDA kernels built, but no CUDA device is visible")
    else:
        out["cuda"] = BackendStatus("cuda", True, ("cuda",), f"CUDA kernels on {torch.cuda.get_device_name()}")
    return out


def requested_backend(backend: str | None) -> str:
    choice = backend if backend is not None else os.environ.get("SUPANALYSIS_BACKEND", "auto")
    choice = choice.strip().lower()
    if choice not in _VALID_CHOICES:
        raise ValueError(f"backend must be one of {_VALID_CHOICES}, got {choice!r}")
    return choice


_warned: set[tuple[str, str, str]] = set()


def resolve(
    op: str,
    device: torch.device,
    backend: str | None,
    implemented: Sequence[str],
    preferred: dict[str, Sequence[str]],
    dtype: torch.dtype | None = None,
) -> str:
    """The backend that runs ``op`` on ``device`` for inputs of ``dtype``.

    ``implemented`` lists the backends this op has; ``preferred`` maps a device type to the
    order ``auto`` tries them in when the dispatch table has no measurement.
    """
    choice = requested_backend(backend)
    status = cached_status()
    dev = device.type

    def usable(name: str) -> str | None:
        if name not in implemented:
            return f"op {op!r} has no {name} implementation"
        st = status[name]
        if not st.available:
            return st.reason
        if dev not in st.devices:
            return f"{name} does not run on {dev} tensors"
        return None

    if choice != "auto":
        why = usable(choice)
        if why is not None:
            raise BackendUnavailable(f"backend {choice!r} cannot run {op} on {dev}: {why}")
        return choice
    measured = dispatch.measured_choice(op, device, dtype)
    if measured is not None and usable(measured) is None:
        return measured
    order = list(preferred.get(dev, ())) + ["reference"]
    first_why = None
    for name in order:
        why = usable(name)
        if why is None:
            if name != order[0] and (op, dev, name) not in _warned:
                _warned.add((op, dev, name))
                log.warning("supanalysis: %s on %s uses the %s backend (%s: %s)", op, dev, name, order[0], first_why)
            return name
        first_why = first_why or why
    raise BackendUnavailable(f"no backend can run {op} on {dev}")  # pragma: no cover


def available_backends(op_implemented: Sequence[str], device: str | torch.device) -> list[str]:
    """Backends of an op that can run on ``device`` here (for tests and benchmarks)."""
    dev = torch.device(device).type
    status = cached_status()
    return [b for b in op_implemented if status[b].available and dev in status[b].devices]


def lazy(module: str, attr: str) -> Callable:
    """A callable that imports ``module.attr`` on first use (Triton is optional)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    call.__name__ = attr
    call.__qualname__ = attr
    return call
