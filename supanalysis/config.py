"""Configuration of the superposition-versus-universality test (typed, loadable from TOML/JSON)."""

from __future__ import annotations

import json
import os
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
    """

    expansion: int = 8
    k: int = 16
    tokens: int = 200_000
    batch_size: int = 4096
    lr: float | None = None


@dataclass
class ModelSpec:
    """One model of the pair.

    path: a TinyTransformer folder or a Hugging Face causal LM folder (loaded locally only).
    name: label in the report (default: the folder name).
    sites: sites to analyse (default: every layer's residual stream, ``resid_post.L``).
    dictionary: ``"neuron"`` (the neuron basis), ``"train"`` (a TopK SAE per site, see
        :class:`SAETraining`), a folder holding one SAELens/sparsify dictionary per site
        in subfolders named after the sites, or a mapping site -> dictionary folder.
    """

    path: str = ""
    name: str = ""
    sites: list[str] | None = None
    dictionary: str | dict[str, str] = "neuron"


@dataclass
class Thresholds:
    """Analysis-time thresholds: changing them never recomputes activations.

    tau: best-match correlation at which a feature counts as matched (τ).
    phi: matched fraction below which universality is taken to fail (φ).
    density_floor: a latent is alive (a feature) when its firing density exceeds this.
    params_tolerance: P1 holds when |N_A − N_B| / max ≤ this.
    loss_tolerance: P2 holds when the CI of (L_B − L_A)/L_A lies within ± this.
    C: the compressed-sensing constant in n/m ≤ C·g(p).
    """

    tau: float = 0.5
    phi: float = 0.5
    density_floor: float = 1e-5
    params_tolerance: float = 0.05
    loss_tolerance: float = 0.03
    C: float = 1.0

    def __post_init__(self) -> None:
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be a correlation in [-1, 1], got {self.tau}")
        if not 0.0 <= self.phi <= 1.0:
            raise ValueError(f"phi must be in [0, 1], got {self.phi}")
        if not 0.0 <= self.density_floor < 1.0:
            raise ValueError(f"density_floor must be in [0, 1), got {self.density_floor}")
        if self.C <= 0:
            raise ValueError(f"C must be positive, got {self.C}")


@dataclass
class TestConfig:
    """Everything one run of :func:`supanalysis.run_test` needs.

    model_a, model_b: the two models (equal parameters, different aspect ratio).
    tokens: token ids file (.npy / .bin of uint16/uint32) shared by both models.
    token_dtype: dtype of a headerless .bin file (``uint16`` or ``uint32``).
    seq_len, batch_size: sequences fed to the models.
    eval_tokens: tokens for the eval cross-entropy (premise P2); the first slice of the file.
    stats_tokens: tokens for densities and statistics; the next slice after SAE training.
    match_tokens: of those, tokens also used for the cross-model correlations.
    any_layer: also match every site of A against every site of B.
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
    tokens: str = ""
    token_dtype: str | None = None
    seq_len: int = 128
    batch_size: int = 16
    eval_tokens: int = 20_000
    stats_tokens: int = 100_000
    match_tokens: int = 50_000
    any_layer: bool = True
    activation_threshold: float = 0.0
    sae: SAETraining = field(default_factory=SAETraining)
    thresholds: Thresholds = field(default_factory=Thresholds)
    bootstrap: int = 1000
    seed: int = 0
    device: str | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "eval_tokens", "stats_tokens", "bootstrap"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0 <= self.match_tokens <= self.stats_tokens:
            raise ValueError(f"match_tokens must be in [0, stats_tokens={self.stats_tokens}], got {self.match_tokens}")

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
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        elif path.endswith(".json"):
            with open(path) as fh:
                data = json.load(fh)
        else:
            raise ValueError(f"config must be a .toml or .json file, got {path}")
        base = os.path.dirname(os.path.abspath(path))
        cfg = cls.from_dict(data)
        # Relative paths in a config file are relative to the file, not the working directory.
        for spec in (cfg.model_a, cfg.model_b):
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
    for k, v in data.items():
        sub = _NESTED.get(k) if cls is TestConfig else None
        kwargs[k] = _build(sub, v, f"{where}.{k}") if sub is not None else v
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from exc
