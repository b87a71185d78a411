"""One entry per op: everything registration, dispatch, tests and benchmarks need to know.

An :class:`OpEntry` names the op's ``torch.library`` schema, its fake implementation, its
launchers by backend, the order ``auto`` tries them in per device, the input dtypes each
backend supports, optional named variants per backend, the boundary check that runs
before any launcher, an example-input builder (for ``opcheck``, ``torch.compile`` and the
fuzz tests) and the benchmark cases that time it. :func:`register` turns an entry into
``torch.ops.supanalysis.<name>``; nothing else registers ops.

Variants (``supanalysis/ops/cuda_variants.py``, optional: ``VARIANTS = {op: {name:
launcher}}``) are alternative CUDA launchers of an op. They are reachable as
``entry.implementation("cuda", variant=name)``, listed by :func:`supanalysis.backends`,
and chosen by ``auto`` only where the dispatch table names them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .. import _backend, dispatch
from ._common import FLOAT_DTYPES

INDEX_DTYPES = (torch.int32, torch.int64)
#: The order ``auto`` tries backends in per device when the dispatch table has no measurement.
FAST_FIRST = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
#: Launcher name suffix per backend (DESIGN.md's names: ``<op>_reference``, ``<op>_cpu``, ...).
SUFFIXES = {"reference": "reference", "cpp": "cpu", "triton": "triton", "cuda": "cuda"}
VARIANTS_MODULE = "supanalysis.ops.cuda_variants"
#: Modules of this package that hold no op.
NOT_OPS = ("_common", "registry", "cuda_variants")


@dataclass(frozen=True)
class Example:
    """Sizes and kind of one example input set; each op reads the fields it needs.

    ``T`` tokens, ``n`` features, ``k`` a second size (n_b, m or top-k width), ``dtype`` of
    the data tensor the op dispatches on, ``special`` one of "", "nan", "inf", "huge" (a
    value written into that tensor) and ``bad_index`` an out-of-range index to plant.
    """

    T: int = 5
    n: int = 7
    k: int = 3
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    seed: int = 0
    special: str = ""
    bad_index: int | None = None

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


@dataclass(frozen=True)
class OpEntry:
    """Everything about one ``supanalysis::<name>`` op (see the module docstring).

    ``check(backend, *args)`` runs on the op's arguments (``backend`` = the resolved name,
    the schema's ``backend`` argument removed) before any launcher; it raises ValueError or
    TypeError naming the argument. ``dispatch_arg`` names the argument whose device and
    dtype choose the backend (``dispatch_dtype`` overrides its dtype where it does not
    change the cost). ``example(Example) -> args`` builds the op's arguments (without
    ``backend``); ``special_values`` lists the specials the op defines a result for.
    ``dtypes`` maps a backend to the dtypes of ``dispatch_arg`` it supports (every backend:
    :data:`FLOAT_DTYPES` by default).
    """

    name: str
    schema: str
    fake: Callable
    implementations: Mapping[str, Callable]
    dispatch_arg: str
    check: Callable
    example: Callable[[Example], tuple]
    preferred: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(FAST_FIRST))
    dtypes: Mapping[str, tuple[torch.dtype, ...]] = field(default_factory=dict)
    bench_cases: tuple[str, ...] = ()
    dispatch_dtype: torch.dtype | None = None
    special_values: tuple[str, ...] = ("nan", "inf", "huge")
    variants: Mapping[str, Mapping[str, Callable]] = field(default_factory=dict)

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self.implementations)

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in torch._C.parse_schema(f"supanalysis::{self.name}{self.schema}").arguments)

    @property
    def op(self):
        """The registered ``torch.ops.supanalysis.<name>.default`` overload."""
        return getattr(torch.ops.supanalysis, self.name).default

    def all_variants(self) -> dict[str, dict[str, Callable]]:
        """Declared variants merged with ``cuda_variants.VARIANTS`` for this op."""
        out = {b: dict(v) for b, v in self.variants.items()}
        extra = cuda_variants().get(self.name, {})
        if extra:
            out.setdefault("cuda", {}).update(extra)
        return out

    def implementation(self, backend: str, variant: str = "") -> Callable:
        """The launcher of ``backend`` (or of its named ``variant``), callable directly."""
        if backend not in self.implementations:
            raise ValueError(f"op {self.name!r} has no {backend!r} implementation; it has {self.backends}")
        if not variant:
            return self.implementations[backend]
        named = self.all_variants().get(backend, {})
        if variant not in named:
            raise ValueError(f"op {self.name!r} has no {backend} variant {variant!r}; it has {sorted(named)}")
        return named[variant]

    def supported_dtypes(self, backend: str) -> tuple[torch.dtype, ...]:
        """Dtypes ``backend`` computes correctly here: the interpreter has no bf16 arithmetic."""
        dts = self.dtypes.get(backend, FLOAT_DTYPES) if backend in self.implementations else ()
        if backend == "triton" and _backend.triton_interpret() and not torch.cuda.is_available():
            dts = tuple(d for d in dts if d != torch.bfloat16)
        return dts

    def available_backends(self, device: str | torch.device) -> list[str]:
        return _backend.available_backends(self.backends, device)

    def select(self, device: torch.device, backend: str | None, dtype: torch.dtype) -> tuple[str, Callable]:
        """(backend name, launcher) for inputs on ``device`` of ``dtype``."""
        name = _backend.resolve(self.name, device, backend, self.backends, self.preferred, dtype)
        if dtype not in self.supported_dtypes(name):
            where = " under TRITON_INTERPRET=1 (no bfloat16 arithmetic)" if name == "triton" else ""
            raise TypeError(
                f"{self.name}: the {name} backend does not support {dtype}{where}; "
                f"it supports {[str(d) for d in self.supported_dtypes(name)]}"
            )
        variant = dispatch.measured_variant(self.name, device, dtype) if requested_auto(backend) else ""
        if variant and name == dispatch.measured_choice(self.name, device, dtype):
            launcher = self.all_variants().get(name, {}).get(variant)
            if launcher is not None:
                return name, launcher
        return name, self.implementations[name]


def requested_auto(backend: str | None) -> bool:
    return _backend.requested_backend(backend) == "auto"


REGISTRY: dict[str, OpEntry] = {}


def launchers(namespace: Mapping[str, object], op: str) -> dict[str, Callable]:
    """``{backend: namespace["<op>_<suffix>"]}`` for every backend the namespace defines."""
    found = {b: namespace.get(f"{op}_{suffix}") for b, suffix in SUFFIXES.items()}
    return {b: f for b, f in found.items() if callable(f)}


def entry_from(namespace: Mapping[str, object], name: str, schema: str, dispatch_arg: str, **optional) -> OpEntry:
    """The entry of op ``name`` from its module's names: launchers ``<name>_<suffix>``
    (:func:`launchers`), and ``_<name>_check``, ``_<name>_example`` and ``_<name>_fake``
    (a mutating op that returns nothing needs no fake). ``optional``: OpEntry's other fields."""

    def find(kind: str) -> Callable | None:
        return namespace.get(f"_{name}_{kind}")

    fake = find("fake") or _returns_nothing
    return OpEntry(
        name, schema, fake, launchers(namespace, name), dispatch_arg, find("check"), find("example"), **optional
    )


def _returns_nothing(*args) -> None:
    return None


def fake_like(like: torch.Tensor, *spec: tuple[torch.dtype, int | tuple[int, ...]]) -> list[torch.Tensor]:
    """Fake outputs on ``like``'s device: one empty tensor per (dtype, shape) in ``spec``."""
    return [like.new_empty(shape, dtype=dtype, device=like.device) for dtype, shape in spec]


def _body(entry: OpEntry) -> Callable:
    names = entry.arg_names
    bi, di = names.index("backend"), names.index(entry.dispatch_arg)
    schema = torch._C.parse_schema(f"supanalysis::{entry.name}{entry.schema}")
    pack = tuple if len(schema.returns) > 1 else list

    def run(*args):
        t = args[di]
        dtype = entry.dispatch_dtype or t.dtype
        rest = args[:bi] + args[bi + 1 :]
        name, launcher = entry.select(t.device, args[bi] or None, dtype)
        entry.check(name, *rest)
        out = launcher(*rest)
        return None if out is None else pack(out)

    run.__name__ = entry.name
    return run


def register(entry: OpEntry) -> OpEntry:
    """Define ``supanalysis::<name>`` from ``entry`` and record the entry in REGISTRY."""
    if entry.name in REGISTRY:
        raise ValueError(f"op {entry.name!r} is registered twice")
    schema = torch._C.parse_schema(f"supanalysis::{entry.name}{entry.schema}")
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    op = torch.library.custom_op(f"supanalysis::{entry.name}", _body(entry), mutates_args=mutated, schema=entry.schema)
    op.register_fake(entry.fake)
    REGISTRY[entry.name] = entry
    return entry


def entries() -> dict[str, OpEntry]:
    """Every registered op, by name: imports each op module of this package (every module
    but NOT_OPS), which registers its ops, so a new op needs no list to join."""
    package = importlib.import_module(__package__)
    for mod in pkgutil.iter_modules(package.__path__):
        if mod.name not in NOT_OPS:
            importlib.import_module(f"{__package__}.{mod.name}")
    return dict(REGISTRY)


def cuda_variants() -> dict[str, dict[str, Callable]]:
    """``cuda_variants.VARIANTS`` when that module imports, else no variants."""
    try:
        mod = importlib.import_module(VARIANTS_MODULE)
    except ImportError:
        return {}
    return {op: dict(v) for op, v in getattr(mod, "VARIANTS", {}).items()}


def variant_names() -> dict[str, tuple[str, ...]]:
    """``{backend: ("op:variant", ...)}`` over every registered op."""
    out: dict[str, list[str]] = {}
    for name, entry in entries().items():
        for backend, named in entry.all_variants().items():
            out.setdefault(backend, []).extend(f"{name}:{v}" for v in sorted(named))
    return {b: tuple(v) for b, v in out.items()}
