"""Configuration of the superposition-versus-universality test (typed, loadable from TOML/JSON)."""

from __future__ import annotations

import json
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class SAETraining:
    """How to train a TopK SAE for a site whose dictionary is ``"train"``.

    expansion: latents per neuron (d_sae = expansion · m).
    k: active latents per token.
    tokens: activations to train on (from the training slice of the token file).
    batch_size: activations per optimiser step.
    lr: Adam learning rate (None: Gao et al.'s 2e-4 / sqrt(d_sae / 2^14)).
    seed_ceiling: at every trained site of A and B, also train a second SAE with another seed on
        the same activations and report the dictionary-seed ceiling: the fraction of the first
        SAE's alive latents whose best match in the second reaches τ (docs/science.md,
        "Calibration"). Only the first SAE is used by the test; those sites train twice.
    """

    expansion: int = 8
    k: int = 16
    tokens: int = 200_000
    batch_size: int = 4096
    lr: float | None = None
    seed_ceiling: bool = False

    def __post_init__(self) -> None:
        for name in ("expansion", "k", "tokens", "batch_size"):
            _positive_int(self, name)
        if self.lr is not None and not (_is_real(self.lr) and 0 < self.lr < math.inf):
            raise ValueError(f"lr must be a positive finite number or None, got {self.lr!r}")
        if not isinstance(self.seed_ceiling, bool):
            raise ValueError(f"seed_ceiling must be true or false, got {self.seed_ceiling!r}")


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(obj: object, name: str) -> None:
    v = getattr(obj, name)
    # bool is an int subclass: seq_len = true in a config file must not pass as 1.
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


@dataclass
class ModelSpec:
    """One model of the pair.

    path: a TinyTransformer folder or a Hugging Face causal LM folder (loaded locally only).
    name: label in the report (default: the folder name).
    sites: sites to analyse (default: every layer's residual stream, ``resid_post.L``).
    dictionary: ``"neuron"`` (the neuron basis), ``"train"`` (a TopK SAE per site, see
        :class:`SAETraining`), a folder holding one SAELens/sparsify dictionary per site
        in subfolders named after the sites, or a mapping site -> dictionary folder.
    shape: label of the model's architecture; models sharing it are seeds of one shape, whose
        matches are the within-shape ceiling (default "": the model's name, so unlabelled
        models are all different shapes).
    seed: label of the model's training seed within its shape (for the report only).
    """

    path: str = ""
    name: str = ""
    sites: list[str] | None = None
    dictionary: str | dict[str, str] = "neuron"
    shape: str = ""
    seed: str = ""

    def shape_label(self, index: int) -> str:
        """The shape this model belongs to (its own name, or its place in the config, when unlabelled)."""
        return self.shape or self.name or self.path or f"model {index}"


@dataclass
class Thresholds:
    """Analysis-time thresholds: changing them never recomputes activations.

    tau: best-match correlation at which a feature counts as matched (τ).
    phi: matched fraction below which universality is taken to fail (φ).
    density_floor: a latent is alive (a feature) when its firing density exceeds this.
    params_tolerance: P1 holds when |N_A − N_B| / max ≤ this.
    loss_tolerance: P2 holds when the CI of (L_B − L_A)/L_A lies within ± this.
    C: the compressed-sensing constant in n/m ≤ C·g(p).
    max_fvu: P4 holds when every dictionary's held-out FVU is at most this.
    max_dead: P4 holds when every dictionary's dead fraction (1 − alive / latents) is at most this.
    u_margin: the smallest shortfall of U below its ceiling that counts: non-universal when a CI of
        U lies below 1 − u_margin (docs/science.md, "Calibration").
    """

    tau: float = 0.5
    phi: float = 0.5
    density_floor: float = 1e-5
    params_tolerance: float = 0.05
    loss_tolerance: float = 0.03
    C: float = 1.0
    max_fvu: float = 0.1
    max_dead: float = 0.1
    u_margin: float = 0.05

    def __post_init__(self) -> None:
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be a correlation in [-1, 1], got {self.tau}")
        if not 0.0 <= self.phi <= 1.0:
            raise ValueError(f"phi must be in [0, 1], got {self.phi}")
        if not 0.0 <= self.density_floor < 1.0:
            raise ValueError(f"density_floor must be in [0, 1), got {self.density_floor}")
        # NaN compares false with everything: it slipped past `C <= 0`, and the tolerances
        # had no check at all.
        if not (self.C > 0 and self.C < math.inf):
            raise ValueError(f"C must be a positive finite number, got {self.C}")
        for name in ("params_tolerance", "loss_tolerance", "max_fvu", "max_dead"):
            v = getattr(self, name)
            if not 0 <= v < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if not 0.0 <= self.u_margin < 1.0:
            raise ValueError(f"u_margin must be in [0, 1), got {self.u_margin}")


@dataclass
class TestConfig:
    """Everything one run of :func:`supanalysis.run_test` needs.

    model_a, model_b: the two models (equal parameters, different aspect ratio).
    models: a family of models instead (several seeds of each shape): every pair is matched on
        the same tokens, equal-shape pairs give the within-shape ceilings, and the primary pair
        (the first two models of different shapes) becomes model_a and model_b. Empty: the
        family is [model_a, model_b].
    tokens: token ids file (.npy / .bin of uint16/uint32) shared by both models.
    token_dtype: dtype of a headerless .bin file (``uint16`` or ``uint32``).
    seq_len, batch_size: sequences fed to the models.
    eval_tokens: tokens for the eval cross-entropy (premise P2); the first slice of the file.
    stats_tokens: tokens for densities and statistics; the next slice after SAE training.
    match_tokens: of those, tokens also used for the cross-model correlations.
    any_layer: also match every site of A against every site of B.
    match_max_bytes: memory for the cross-model co-moments (8·n_a·n_b bytes per site pair,
        the baselines included). When all of them fit, one streaming pass holds them all
        ("dense"); beyond it the match tokens' codes are kept and each pair's best match is
        computed in row blocks of this size, one pass over the kept codes per block ("tiled").
    match_precision: how dense activations are multiplied in the cross-model co-moments:
        "ieee" (exact float32 products) or "bf16" (centred values rounded to bfloat16: the
        GPU's tensor-core GEMM; <= 2^-9 relative per value, see
        :class:`~supanalysis.CrossCorrelation`). Sparse codes are multiplied exactly either way.
    activation_threshold: a latent fires when its code is above this.
    sae: settings for dictionaries that are trained.
    thresholds: analysis thresholds (see :class:`Thresholds`).
    bootstrap: bootstrap resamples for every confidence interval.
    seed: seed of every random choice (shuffled baseline, bootstrap, SAE initialisation).
    device: where models and kernels run (default: CUDA when available).
    backend: op backend (None: ``SUPANALYSIS_BACKEND`` or auto).
    """

    __test__ = False  # not a pytest test class, despite the name

    model_a: ModelSpec = field(default_factory=ModelSpec)
    model_b: ModelSpec = field(default_factory=ModelSpec)
    models: list[ModelSpec] = field(default_factory=list)
    tokens: str = ""
    token_dtype: str | None = None
    seq_len: int = 128
    batch_size: int = 16
    eval_tokens: int = 20_000
    stats_tokens: int = 100_000
    match_tokens: int = 50_000
    any_layer: bool = True
    match_max_bytes: int = 8 << 30
    match_precision: str = "ieee"
    activation_threshold: float = 0.0
    sae: SAETraining = field(default_factory=SAETraining)
    thresholds: Thresholds = field(default_factory=Thresholds)
    bootstrap: int = 1000
    seed: int = 0
    device: str | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "eval_tokens", "stats_tokens", "bootstrap", "match_max_bytes"):
            _positive_int(self, name)
        self._adopt_family()
        if not isinstance(self.match_tokens, int) or isinstance(self.match_tokens, bool):
            raise ValueError(f"match_tokens must be an int, got {self.match_tokens!r}")
        if not _is_real(self.activation_threshold) or math.isnan(self.activation_threshold):
            raise ValueError(f"activation_threshold must be a number (not NaN), got {self.activation_threshold!r}")
        if not 0 <= self.match_tokens <= self.stats_tokens:
            raise ValueError(f"match_tokens must be in [0, stats_tokens={self.stats_tokens}], got {self.match_tokens}")
        # Fail at load time, naming the field, rather than deep inside a run.
        from ._backend import BACKENDS
        from .data import TOKEN_DTYPES

        if self.backend is not None and self.backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of {('auto', *BACKENDS)} or None, got {self.backend!r}")
        from .ops.cross_moments import PRECISIONS

        if self.match_precision not in PRECISIONS:
            raise ValueError(f"match_precision must be one of {PRECISIONS}, got {self.match_precision!r}")
        if self.token_dtype is not None and self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"token_dtype must be one of {sorted(TOKEN_DTYPES)} or None, got {self.token_dtype!r}")
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"device={self.device!r} is not a torch device ({exc})") from None

    def _adopt_family(self) -> None:
        """With a family, model_a and model_b are its primary pair (given otherwise: refused)."""
        if not self.models:
            return
        if len(self.models) < 2:
            raise ValueError(f"models must list at least two models, got {len(self.models)}")
        ia, ib = self.primary_pair()
        for name, given, member in (
            ("model_a", self.model_a, self.models[ia]),
            ("model_b", self.model_b, self.models[ib]),
        ):
            if given != ModelSpec() and given != member:
                raise ValueError(
                    f"{name} differs from the family's primary pair; give either models or model_a/model_b"
                )
        self.model_a, self.model_b = self.models[ia], self.models[ib]

    def model_specs(self) -> list[ModelSpec]:
        """Every model of the run, in config order (``models``, else ``[model_a, model_b]``)."""
        return list(self.models) if self.models else [self.model_a, self.model_b]

    def primary_pair(self) -> tuple[int, int]:
        """Indices into :meth:`model_specs` of A and B: the first model and the first one of
        another shape after it (a two-model config: always (0, 1))."""
        specs = self.model_specs()
        if not self.models:
            return 0, 1
        first = specs[0].shape_label(0)
        other = next((k for k, s in enumerate(specs) if s.shape_label(k) != first), None)
        if other is None:
            raise ValueError("models are all of one shape: the test needs at least two shapes")
        return 0, other

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TestConfig:
        """Build from a nested dict (as read from TOML/JSON); unknown keys are an error."""
        return _build(cls, data, "config")

    @classmethod
    def load(cls, path: str | os.PathLike) -> TestConfig:
        """Read a ``.toml`` or ``.json`` file."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        # Parse errors name the file (tomllib's and json's own messages do not).
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as fh:
                try:
                    data = tomllib.load(fh)
                except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                    raise ValueError(f"{path} is not valid TOML: {exc}") from exc
        elif path.endswith(".json"):
            with open(path, "rb") as fh:
                try:
                    data = json.loads(fh.read().decode("utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        else:
            raise ValueError(f"config must be a .toml or .json file, got {path}")
        base = os.path.dirname(os.path.abspath(path))
        try:
            cfg = cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        # Relative paths in a config file are relative to the file, not the working directory.
        specs = {id(s): s for s in (cfg.model_a, cfg.model_b, *cfg.models)}
        for spec in specs.values():
            if spec.path and not os.path.isabs(spec.path):
                spec.path = os.path.join(base, spec.path)
        if cfg.tokens and not os.path.isabs(cfg.tokens):
            cfg.tokens = os.path.join(base, cfg.tokens)
        return cfg


_NESTED = {"model_a": ModelSpec, "model_b": ModelSpec, "sae": SAETraining, "thresholds": Thresholds}


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a table/object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for k, v in data.items():
        sub = _NESTED.get(k) if cls is TestConfig else None
        if cls is TestConfig and k == "models":
            if not isinstance(v, list):
                raise ValueError(f"{where}.models must be a list of model tables, got {v!r}")
            kwargs[k] = [_build(ModelSpec, m, f"{where}.models[{n}]") for n, m in enumerate(v)]
            continue
        if sub is None and not _matches(v, hints[k]):
            # Without this, tokens = 5 or path = 5 failed later in os.path with a TypeError that
            # names no field, and any_layer = "no" (truthy) was silently taken as true.
            raise ValueError(f"{where}.{k} must be {_type_name(hints[k])}, got {v!r}")
        kwargs[k] = _build(sub, v, f"{where}.{k}") if sub is not None else v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _matches(value: Any, hint: Any) -> bool:
    """Whether a value read from TOML/JSON fits a field annotation (str, int, float, bool,
    None, unions, list[...] and dict[..., ...]); ints pass for floats, bools never for numbers."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return _is_real(value)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")
