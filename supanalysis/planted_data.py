"""Token streams driven by planted sparse features whose firing probabilities are known.

Vocabulary: ``background`` tokens drawn from a Zipf distribution, then one trigger token
a_f and one outcome token b_f per planted feature f. Feature f fires at a position with
probability p_f (log-spaced over several decades); when it fires the stream holds a_f
there and b_f at the next position. Predicting b_f needs "f is active here", so a
language model trained on the stream has to represent every feature it can afford to,
and the label of every position (which feature fired there, or none) is kept, so each
measured number can be compared with the truth.

The stream is generated as *slots*: a slot is one background token or one two-token
signature. With slot probabilities q_f = p_f / (1 − P), P = Σ p_f, the expected fraction
of positions holding a_f is exactly p_f (a slot covers 1 + Q positions on average,
Q = Σ q_f = P / (1 − P)), and the background takes 1 − 2P of the positions.

Planting modes (:func:`family_streams`) build the two-sided test of the test: in
``"universal"`` both model families train on streams where every feature occurs; in
``"non-universal"`` the second family's stream omits half of the features (their slots have
probability 0, so neither a_f nor b_f ever appears), while every model is measured on the same
test tokens, which hold all features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import SAETraining

#: label of a position where no planted feature fires (background or an outcome token)
NO_FEATURE = -1
#: the planting modes: every feature shared, or half of them absent from family B's training data
MODES = ("universal", "non-universal")
#: the family of one planted run, in run_test's order (primary pair first): (shape, seed label)
FAMILY = (("A", "0"), ("B", "0"), ("A", "1"), ("B", "1"))
PRIMARY = ("A0", "B0")


@dataclass(frozen=True)
class PlantedSpec:
    """The planted ground truth.

    n_features: planted features F.
    p_min, p_max: firing probabilities p_f are log-spaced from p_max (feature 0) down to p_min.
    background: Zipf-distributed background vocabulary size.
    zipf_exponent: background token r (0-based rank) has probability ∝ (r + 1)^(−exponent).
    """

    n_features: int = 16
    p_min: float = 1e-3
    p_max: float = 0.05
    background: int = 32
    zipf_exponent: float = 1.0

    @property
    def densities(self) -> np.ndarray:
        """p_f per feature, float64 [F], decreasing."""
        if self.n_features == 1:
            return np.array([self.p_max])
        return np.geomspace(self.p_max, self.p_min, self.n_features)

    @property
    def vocab_size(self) -> int:
        return self.background + 2 * self.n_features

    def __post_init__(self) -> None:
        if self.n_features < 1 or self.background < 2:
            raise ValueError(f"need n_features >= 1 and background >= 2, got {self.n_features}, {self.background}")
        if not 0 < self.p_min <= self.p_max < 1:
            raise ValueError(f"need 0 < p_min <= p_max < 1, got p_min={self.p_min}, p_max={self.p_max}")
        if self.zipf_exponent < 0:
            raise ValueError(f"zipf_exponent must be >= 0, got {self.zipf_exponent}")
        total = float(self.densities.sum())
        if total >= 0.5:
            # Each firing takes two positions: beyond 1/2 there is no room left for background.
            raise ValueError(f"Σ p_f = {total:.3f} must stay below 0.5; lower p_max or n_features")

    def trigger(self, f: int) -> int:
        """Token id a_f that opens feature f's signature."""
        return self.background + f

    def outcome(self, f: int) -> int:
        """Token id b_f that follows a_f."""
        return self.background + self.n_features + f

    @property
    def decades(self) -> float:
        return math.log10(self.p_max / self.p_min)


def generate(
    spec: PlantedSpec, n_tokens: int, seed: int = 0, absent: tuple[int, ...] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """``n_tokens`` token ids (uint16) and their labels (int16: the feature firing there, else -1).

    absent: features that never fire in this stream; the others keep their p_f.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if any(not 0 <= f < spec.n_features for f in absent):
        raise ValueError(f"absent features must lie in [0, {spec.n_features}), got {absent}")
    rng = np.random.default_rng(seed)
    p = spec.densities.copy()
    p[list(absent)] = 0.0
    P = float(p.sum())
    q = p / (1.0 - P)
    ranks = np.arange(1, spec.background + 1, dtype=np.float64)
    zipf = ranks ** (-spec.zipf_exponent)
    slot_probs = np.concatenate([q, (1.0 - q.sum()) * zipf / zipf.sum()])
    # Enough slots for n_tokens positions with a margin (a slot averages 1 + Q positions).
    n_slots = int(n_tokens / (1.0 + q.sum()) * 1.02) + 64
    tokens, labels, have = [], [], 0
    while have < n_tokens:
        kind = rng.choice(slot_probs.size, size=n_slots, p=slot_probs)
        fires = kind < spec.n_features
        width = np.where(fires, 2, 1)
        ends = np.cumsum(width)
        tok = np.empty(int(ends[-1]), dtype=np.int64)
        lab = np.full(tok.size, NO_FEATURE, dtype=np.int64)
        starts = ends - width
        # Background slot: its token. Feature slot: a_f at the start, b_f right after.
        tok[starts] = np.where(fires, spec.background + kind, kind - spec.n_features)
        tok[starts[fires] + 1] = spec.background + spec.n_features + kind[fires]
        lab[starts[fires]] = kind[fires]
        tokens.append(tok)
        labels.append(lab)
        have += tok.size
    tok = np.concatenate(tokens)[:n_tokens]
    lab = np.concatenate(labels)[:n_tokens]
    return tok.astype(np.uint16), lab.astype(np.int16)


def indicators(labels: np.ndarray, n_features: int) -> np.ndarray:
    """One-hot planted indicators [T, F] (float32) from labels [T]."""
    labels = np.asarray(labels).reshape(-1)
    out = np.zeros((labels.size, n_features), dtype=np.float32)
    on = labels >= 0
    out[np.nonzero(on)[0], labels[on]] = 1.0
    return out


def absent_features(spec: PlantedSpec, mode: str) -> tuple[int, ...]:
    """The features family B never sees in ``mode``: none, or every other one (1, 3, 5, ...),
    so the absent half spans the whole density range."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return tuple(range(1, spec.n_features, 2)) if mode == "non-universal" else ()


@dataclass
class FamilyStreams:
    """The token streams of one planted run (uint16 tokens, int16 labels).

    train_a / train_b: training streams of family A and family B [n_train]; labels_b: B's labels.
    test / test_labels: the measurement tokens every model sees [n_test]; all features occur.
    absent: the features missing from train_b.
    """

    train_a: np.ndarray
    train_b: np.ndarray
    labels_b: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    absent: tuple[int, ...]


def family_streams(spec: PlantedSpec, mode: str, n_train: int, n_test: int, seed: int = 0) -> FamilyStreams:
    """Deterministic streams for ``mode``: A's training stream and the test tokens are one draw
    (train | test), B's training stream an independent draw with its absent features removed."""
    absent = absent_features(spec, mode)
    tokens, labels = generate(spec, n_train + n_test, seed=seed)
    # Seeded apart from A's draw: in both modes family B trains on tokens family A never saw.
    train_b, labels_b = generate(spec, n_train, seed=seed + 1_000_003, absent=absent)
    return FamilyStreams(tokens[:n_train], train_b, labels_b, tokens[n_train:], labels[n_train:], absent)


@dataclass(frozen=True)
class PlantedSize:
    """Sizes of one planted run (the full one and --quick share every code path)."""

    spec: PlantedSpec
    shape_a: tuple[int, int, int]  # (n_layers, d_model, n_heads)
    shape_b: tuple[int, int, int]
    lm_tokens: int  # training stream of the language models
    lm_steps: int
    sae: SAETraining
    eval_tokens: int
    stats_tokens: int
    match_tokens: int
    bootstrap: int
    sites_b: tuple[str, ...] | None = None  # None: every layer of B
    seq_len: int = 64


# Model A wide-shallow, B narrow-deep, 12·L·d² equal. Densities span 2 decades (full) / 1.7 (quick).
FULL = PlantedSize(
    PlantedSpec(n_features=16, p_min=5e-4, p_max=0.05, background=32), (2, 64, 4), (8, 32, 4),
    lm_tokens=2_000_000, lm_steps=1500, sae=SAETraining(expansion=4, k=4, tokens=400_000, batch_size=128, lr=1e-2),
    eval_tokens=20_000, stats_tokens=200_000, match_tokens=100_000, bootstrap=1000,
)  # fmt: skip
QUICK = PlantedSize(
    PlantedSpec(n_features=16, p_min=1e-3, p_max=0.05, background=16), (1, 32, 2), (4, 16, 2),
    lm_tokens=400_000, lm_steps=400, sae=SAETraining(expansion=4, k=4, tokens=150_000, batch_size=128, lr=1e-2),
    eval_tokens=2_000, stats_tokens=40_000, match_tokens=20_000, bootstrap=200,
    sites_b=("resid_post.3",),
)  # fmt: skip
