"""A state comes in (a file, load_state_dict) only if some sequence of updates can produce it.

The crafted files below carry a valid sha256 of their (impossible) contents: the checksum
vouches for the bytes, not for the statistics, so the state itself is validated too.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import supanalysis as sa
from supanalysis.accumulators._state import FORMAT_VERSION, _digest

G = torch.Generator().manual_seed(5)
X = torch.randn(50, 5, generator=G, dtype=torch.float64)
X[:, 4] = float("nan")  # a feature with no finite value
X[3, 2] = float("inf")
IDX = torch.stack([torch.randperm(5, generator=G)[:3] for _ in range(50)])
IDX[::4, 2] = -1

ACCS = {
    "ActivationStats": (sa.ActivationStats(5, 0.2).update(X), {"n_features": 5, "threshold": 0.2}),
    "CrossCorrelation": (sa.CrossCorrelation(3, 2).update(X[:, :3], X[:, 3:4].expand(-1, 2) * 2), {"n_a": 3, "n_b": 2}),
    "CoActivation": (sa.CoActivation(5, 0.2).update(X), {"n": 5, "threshold": 0.2}),
    "SparseCoActivation": (sa.SparseCoActivation(5).update_sparse(IDX), {"n": 5, "threshold": 0.0}),
}
CLASSES = {k: type(acc) for k, (acc, _) in ACCS.items()}


def _craft(path, kind: str, state: dict[str, torch.Tensor], config: dict, checksum: bool = True):
    """Write ``state`` as an accumulator file whose sha256 matches whatever it holds."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {"kind": kind, "version": FORMAT_VERSION, **config}
    if checksum:
        meta["sha256"] = _digest(tensors, meta)
    save_file(tensors, str(path), metadata={"supanalysis": json.dumps(meta)})
    return path


def _set(t: torch.Tensor, i, v) -> torch.Tensor:
    t = t.clone()
    t[i] = v
    return t


def _stats_edits(s):
    # feature 4 never had a finite value; feature 0 fired at least once (threshold 0.2)
    assert int(s["finite_count"][4]) == 0 and int(s["fire_count"][0]) > 0
    j = int(torch.nonzero(s["l0_hist"])[0])
    shifted = _set(_set(s["l0_hist"], j, s["l0_hist"][j] - 1), j + 1, s["l0_hist"][j + 1] + 1)
    return {
        "mean NaN": {"mean": _set(s["mean"], 0, float("nan"))},
        "mean inf": {"mean": _set(s["mean"], 1, float("inf"))},
        "mean > max": {"mean": _set(s["mean"], 2, s["max"][2] + 1)},
        "mean < min": {"mean": _set(s["mean"], 2, s["min"][2] - 1)},
        "mean where nothing was seen": {"mean": _set(s["mean"], 4, 1.0)},
        "m2 NaN": {"m2": _set(s["m2"], 0, float("nan"))},
        "m2 < 0 (tiny)": {"m2": _set(s["m2"], 0, -1e-300)},
        "active_sum inf": {"active_sum": _set(s["active_sum"], 1, float("inf"))},
        "active_sum NaN": {"active_sum": _set(s["active_sum"], 1, float("nan"))},
        "active_sum above fire x max": {"active_sum": _set(s["active_sum"], 0, s["fire_count"][0] * s["max"][0] + 1)},
        "active_sum without firing": {"active_sum": _set(s["active_sum"], 4, 0.5)},
        "max at the threshold though it fired": {"max": _set(s["max"], 0, 0.2)},
        "min above the threshold though not all fired": {"min": _set(s["min"], 0, 0.25)},
        "max NaN": {"max": _set(s["max"], 0, float("nan"))},
        "max < min": {"max": _set(s["max"], 1, s["min"][1] - 1)},
        "fire_count < 0": {"fire_count": _set(s["fire_count"], 0, -1)},
        "fire_count > finite_count": {"fire_count": _set(s["fire_count"], 4, 1)},
        "finite_count > n_tokens": {"finite_count": s["finite_count"] + 100},
        "n_tokens < 0": {"n_tokens": torch.tensor(-1)},
        "l0_hist firings differ from fire_count": {"l0_hist": shifted},
        "l0_hist < 0": {"l0_hist": _set(s["l0_hist"], 0, -1)},
    }


def _corr_edits(s):
    zero = {k: torch.zeros_like(v) for k, v in s.items()}
    return {
        "mean_a NaN": {"mean_a": _set(s["mean_a"], 0, float("nan"))},
        "mean_b inf": {"mean_b": _set(s["mean_b"], 1, float("inf"))},
        "m2_a < 0": {"m2_a": _set(s["m2_a"], 0, -1.0)},
        "m2_b NaN": {"m2_b": _set(s["m2_b"], 0, float("nan"))},
        "comoment NaN": {"comoment": _set(s["comoment"], (0, 1), float("nan"))},
        "n_tokens < 0": {"n_tokens": torch.tensor(-1)},
        "n_skipped < 0": {"n_skipped": torch.tensor(-3)},
        "moments without tokens": {**zero, "comoment": _set(zero["comoment"], (0, 0), 1.0)},
    }


def _coact_edits(s):
    C, n = s["counts"], int(s["n_tokens"])
    both_always = torch.zeros_like(C)
    both_always[0, 0] = both_always[1, 1] = n  # both fire on every token, yet never together
    return {
        "negative": {"counts": -C},
        "asymmetric": {"counts": _set(C, (0, 1), C[0, 1] + 1)},
        "pair above a firing count": {"counts": C + 1000 * (1 - torch.eye(5, dtype=torch.long))},
        "firing above n_tokens": {"n_tokens": torch.tensor(1)},
        "pair below f_i + f_j - n_tokens": {"counts": both_always},
        "n_tokens < 0": {"n_tokens": torch.tensor(-1)},
    }


def _sparse_edits(s):
    keys, counts, fire, nt = s["keys"], s["counts"], s["fire_count"], int(s["n_tokens"])
    assert keys.numel() > 1
    full = torch.full_like(fire, nt)
    return {
        "keys unsorted": {"keys": keys.flip(0), "counts": counts.flip(0)},
        "keys repeated": {"keys": _set(keys, 1, keys[0])},
        "key out of range": {"keys": _set(keys, -1, 25)},
        "count above a firing count": {"counts": counts + 10**6},
        "count zero": {"counts": _set(counts, 0, 0)},
        "count below f_a + f_b - n_tokens": {"fire_count": full, "counts": torch.ones_like(counts)},
        "fire_count < 0": {"fire_count": -fire},
        "fire_count > n_tokens": {"fire_count": fire + nt},
        "counts and keys of different lengths": {"counts": counts[:-1]},
        "n_tokens < 0": {"n_tokens": torch.tensor(-1)},
    }


EDITS = {"ActivationStats": _stats_edits, "CrossCorrelation": _corr_edits, "CoActivation": _coact_edits,
         "SparseCoActivation": _sparse_edits}  # fmt: skip
CASES = [(kind, name) for kind, edits in EDITS.items() for name in edits(ACCS[kind][0].state_dict())]


@pytest.mark.parametrize(("kind", "edit"), CASES, ids=[f"{k}-{e}" for k, e in CASES])
def test_impossible_state_with_a_valid_checksum_is_refused(tmp_path, kind, edit):
    acc, config = ACCS[kind]
    state = {**acc.state_dict(), **EDITS[kind](acc.state_dict())[edit]}
    path = _craft(tmp_path / "crafted.safetensors", kind, state, config)
    with pytest.raises(ValueError, match="inconsistent state") as exc:
        CLASSES[kind].load(path)
    assert str(path) in str(exc.value)
    with pytest.raises(ValueError, match="inconsistent state"):
        CLASSES[kind].load(path, trusted=True)
    with pytest.raises(ValueError, match="inconsistent state"):
        CLASSES[kind](**config).load_state_dict(state)


@pytest.mark.parametrize("kind", sorted(ACCS))
def test_the_untouched_state_and_the_unedited_crafted_file_load(tmp_path, kind):
    acc, config = ACCS[kind]
    back = CLASSES[kind].load(_craft(tmp_path / "same.safetensors", kind, acc.state_dict(), config))
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in acc.state_dict().items())
    fresh = CLASSES[kind](**config)
    fresh.load_state_dict(fresh.state_dict())


@pytest.mark.parametrize("kind", sorted(ACCS))
def test_a_file_without_checksum_loads_only_when_trusted(tmp_path, kind):
    acc, config = ACCS[kind]
    path = _craft(tmp_path / "plain.safetensors", kind, acc.state_dict(), config, checksum=False)
    with pytest.raises(ValueError, match=r"no sha256 checksum.*trusted=True"):
        CLASSES[kind].load(path)
    back = CLASSES[kind].load(path, trusted=True)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in acc.state_dict().items())
    # Trust skips only the missing checksum: a wrong one is still refused.
    bad = _craft(tmp_path / "wrong.safetensors", kind, acc.state_dict(), {**config, "sha256": "0" * 64}, False)
    with pytest.raises(ValueError, match="checksum mismatch"):
        CLASSES[kind].load(bad, trusted=True)


@pytest.mark.parametrize("kind", ["ActivationStats", "CoActivation", "SparseCoActivation"])
@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -float("inf"), "0.2", True, None])
def test_a_file_with_a_bad_threshold_is_refused(tmp_path, kind, threshold):
    acc, config = ACCS[kind]
    path = _craft(tmp_path / "thr.safetensors", kind, acc.state_dict(), {**config, "threshold": threshold})
    with pytest.raises(ValueError, match=r"bad \w+ metadata: threshold=.* is not a finite real number"):
        CLASSES[kind].load(path)


# ------------------------------------------------------------------ every state updates make is valid

VALUES = st.sampled_from(["normal", "equal", "nan-rows", "huge", "offset", "half"])


def _batch(kind: str, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 4, generator=g, dtype=torch.float64)
    if kind == "equal":  # a mean of equal values rounds past them (3 x 0.1 / 3 > 0.1)
        x = torch.full((T, 4), 0.1, dtype=torch.float64)
    elif kind == "nan-rows":
        x[::2] = float("nan")
        x[1::3, 1] = -float("inf")
    elif kind == "huge":
        x = x * 1e150
    elif kind == "offset":
        x = 1e8 + x * 1e-4
    elif kind == "half":
        x = x.half().float()
    return x


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    parts=st.lists(st.tuples(st.integers(0, 9), VALUES), min_size=1, max_size=5),
    threshold=st.sampled_from([0.0, 0.1, -0.5, 1e8]),
    backend=st.sampled_from(["reference", "cpp"]),
)
def test_every_state_updates_and_merges_produce_loads_back(parts, threshold, backend):
    stats, other = sa.ActivationStats(4, threshold, backend=backend), sa.ActivationStats(4, threshold)
    cc = sa.CrossCorrelation(4, 3, backend=backend)
    co, sp = sa.CoActivation(4, threshold, backend=backend), sa.SparseCoActivation(4, threshold)
    for i, (T, values) in enumerate(parts):
        x = _batch(values, T, i)
        (stats if i % 2 else other).update(x)
        idx = torch.argsort(x.nan_to_num(-1.0), dim=1, descending=True)[:, :2].contiguous()
        vals = x.gather(1, idx)
        stats.update_sparse(idx, vals)
        if bool(x.isfinite().all()):
            cc.update(x, x[:, :3] * 2 - 1).update_sparse(idx, vals, idx[:, :1] % 3, vals[:, :1] * 3)
        co.update(x)
        sp.update_sparse(idx, vals)
    stats.merge(other)
    for acc in (stats, cc, co, sp):
        fresh = type(acc)(**acc.config())
        fresh.load_state_dict(acc.state_dict())
