"""Token streams driven by planted sparse *context* features whose densities are known.

Vocabulary: ``background`` tokens, then one trigger token a_f per planted feature f. Outside
every feature the stream is background tokens drawn from a Zipf law. Feature f is a context:
its trigger a_f opens a window of ``window`` positions in which the tokens follow f's own
distribution, the background's Zipf law rotated by s_f ranks (f's most likely token is
background token s_f, and so on). Feature f is *active* at those window positions, which make
up a fraction p_f of the stream (log-spaced over several decades). Predicting the tokens of a
window needs "f is active here", which only attention back to a_f can tell, so a language
model trained on the stream has to carry every feature it can afford to through the window.
The label of every position (which feature is active there, or none) is kept, so each
measured number can be compared with the truth.

Why contexts and not tokens: a planted feature that *is* a token is present in every model's
embedding, trained on it or not, and a dictionary gives that fixed vector a consistent latent;
the non-universal planting could then never remove it. A context exists in a model only if
its training data made the model compute it.

The stream is generated as *slots*: a slot is one background token or one segment (a_f and
its window). With segment probabilities q_f and Q = Σ q_f, a slot covers 1 + w·Q positions on
average, so q_f = p_f (1 + w·Q) / w gives window coverage exactly p_f; summing,
Q = P / (w (1 − P)) with P = Σ p_f.

Planting modes (:func:`family_streams`) build the two-sided test of the test: in
``"universal"`` both model families train on streams where every feature is a context; in
``"non-universal"`` the second family's stream keeps half of the features' triggers at their
rates but strips their meaning: the window after an absent a_f is plain background, so the
token statistics match and only the context is missing. Every model is measured on the same
test tokens, in which every feature is a context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import SAETraining

#: label of a position where no planted feature is active (background or a trigger)
NO_FEATURE = -1
#: the planting modes: every feature shared, or half of them meaningless in family B's training data
MODES = ("universal", "non-universal")
#: the family of one planted run, in run_test's order (primary pair first): (shape, seed label)
FAMILY = (("A", "0"), ("B", "0"), ("A", "1"), ("B", "1"))
PRIMARY = ("A0", "B0")
#: the largest total window coverage Σ p_f: the rest of the stream is background
MAX_COVERAGE = 0.8


@dataclass(frozen=True)
class PlantedSpec:
    """The planted ground truth.

    n_features: planted features F (at most background − 1: each needs its own rotation).
    p_min, p_max: window coverages p_f, log-spaced from p_max (feature 0) down to p_min.
    background: Zipf-distributed background vocabulary size.
    zipf_exponent: background token r (0-based rank) has probability ∝ (r + 1)^(−exponent).
    window: positions after a trigger at which its feature is active.
    """

    n_features: int = 16
    p_min: float = 1e-3
    p_max: float = 0.05
    background: int = 32
    zipf_exponent: float = 1.0
    window: int = 16

    @property
    def densities(self) -> np.ndarray:
        """p_f per feature, float64 [F], decreasing."""
        if self.n_features == 1:
            return np.array([self.p_max])
        return np.geomspace(self.p_max, self.p_min, self.n_features)

    @property
    def vocab_size(self) -> int:
        return self.background + self.n_features

    def __post_init__(self) -> None:
        if self.n_features < 1 or self.background < 2:
            raise ValueError(f"need n_features >= 1 and background >= 2, got {self.n_features}, {self.background}")
        if self.n_features > self.background - 1:
            limit = self.background - 1
            raise ValueError(f"n_features must be at most background - 1 = {limit}, got {self.n_features}")
        if not 0 < self.p_min <= self.p_max < 1:
            raise ValueError(f"need 0 < p_min <= p_max < 1, got p_min={self.p_min}, p_max={self.p_max}")
        if self.zipf_exponent < 0:
            raise ValueError(f"zipf_exponent must be >= 0, got {self.zipf_exponent}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        total = float(self.densities.sum())
        if total > MAX_COVERAGE:
            raise ValueError(f"Σ p_f = {total:.3f} must stay at most {MAX_COVERAGE}; lower p_max or n_features")

    def trigger(self, f: int) -> int:
        """Token id a_f that opens feature f's window."""
        return self.background + f

    def rotation(self, f: int) -> int:
        """s_f: feature f's window draws background rank r as token (r + s_f) mod background."""
        return 1 + f

    def zipf(self) -> np.ndarray:
        """The background's token probabilities, float64 [background], by rank."""
        z = np.arange(1, self.background + 1, dtype=np.float64) ** (-self.zipf_exponent)
        return z / z.sum()

    @property
    def decades(self) -> float:
        return math.log10(self.p_max / self.p_min)


def _segment_probabilities(spec: PlantedSpec) -> np.ndarray:
    """q_f: the probability that a slot is feature f's segment (module docstring)."""
    p, w = spec.densities, spec.window
    Q = p.sum() / (w * (1.0 - p.sum()))
    return p * (1.0 + w * Q) / w


def generate(
    spec: PlantedSpec, n_tokens: int, seed: int = 0, absent: tuple[int, ...] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """``n_tokens`` token ids (uint16) and their labels (int16: the feature active there, else -1).

    absent: features whose triggers keep their rate but open no context (plain background
    follows, labelled -1).
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if any(not 0 <= f < spec.n_features for f in absent):
        raise ValueError(f"absent features must lie in [0, {spec.n_features}), got {absent}")
    # Slots and window tokens from separate streams: a shorter draw is then a prefix of a longer one.
    slot_seq, window_seq = np.random.SeedSequence(seed).spawn(2)
    rng, rng_w = np.random.default_rng(slot_seq), np.random.default_rng(window_seq)
    F, w, V = spec.n_features, spec.window, spec.background
    q = _segment_probabilities(spec)
    zipf = spec.zipf()
    slot_probs = np.concatenate([q, (1.0 - q.sum()) * zipf])
    shift = np.array([spec.rotation(f) for f in range(F)] + [0])  # index F: no rotation
    meaningless = np.zeros(F + 1, dtype=bool)
    meaningless[list(absent)] = True
    n_slots = int(n_tokens / (1.0 + w * q.sum()) * 1.02) + 64
    tokens, labels, have = [], [], 0
    while have < n_tokens:
        kind = rng.choice(slot_probs.size, size=n_slots, p=slot_probs)
        seg = kind < F
        width = np.where(seg, 1 + w, 1)
        starts = np.cumsum(width) - width
        tok = np.empty(int(starts[-1] + width[-1]), dtype=np.int64)
        lab = np.full(tok.size, NO_FEATURE, dtype=np.int64)
        tok[starts[~seg]] = kind[~seg] - F
        tok[starts[seg]] = V + kind[seg]
        # Window positions: a Zipf rank, rotated by the feature's s_f unless its context is absent.
        f = np.repeat(kind[seg], w)
        pos = (starts[seg][:, None] + 1 + np.arange(w)).reshape(-1)
        f_eff = np.where(meaningless[f], F, f)
        tok[pos] = (rng_w.choice(V, size=pos.size, p=zipf) + shift[f_eff]) % V
        lab[pos] = np.where(meaningless[f], NO_FEATURE, f)
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
    """The features whose context family B never sees in ``mode``: none, or every other one (1, 3, 5, ...),
    so the absent half spans the whole density range."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return tuple(range(1, spec.n_features, 2)) if mode == "non-universal" else ()


@dataclass
class FamilyStreams:
    """The token streams of one planted run (uint16 tokens, int16 labels).

    train_a / train_b: training streams of family A and family B [n_train]; labels_b: B's labels.
    test / test_labels: the measurement tokens every model sees [n_test]; all features occur.
    absent: the features whose context train_b lacks.
    """

    train_a: np.ndarray
    train_b: np.ndarray
    labels_b: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    absent: tuple[int, ...]


def family_streams(spec: PlantedSpec, mode: str, n_train: int, n_test: int, seed: int = 0) -> FamilyStreams:
    """Deterministic streams for ``mode``: A's training stream and the test tokens are one draw
    (train | test), B's training stream an independent draw with its absent features stripped of their context."""
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


# Model A wide-shallow, B narrow-deep, 12·L·d² equal. Window coverages span 2.2 decades (full) / 1.7 (quick); a
# small background keeps the contexts a large share of what a dictionary has to represent.
FULL = PlantedSize(
    PlantedSpec(n_features=16, p_min=1e-3, p_max=0.15, background=17, window=16), (2, 64, 4), (8, 32, 4),
    lm_tokens=2_000_000, lm_steps=1500, sae=SAETraining(expansion=4, k=4, tokens=400_000, batch_size=128, lr=1e-2),
    eval_tokens=20_000, stats_tokens=200_000, match_tokens=100_000, bootstrap=1000,
)  # fmt: skip
QUICK = PlantedSize(
    PlantedSpec(n_features=16, p_min=3e-3, p_max=0.15, background=17, window=16), (1, 32, 2), (4, 16, 2),
    lm_tokens=400_000, lm_steps=400, sae=SAETraining(expansion=4, k=4, tokens=150_000, batch_size=128, lr=1e-2),
    eval_tokens=2_000, stats_tokens=40_000, match_tokens=20_000, bootstrap=200,
    sites_b=("resid_post.3",),
)  # fmt: skip
