"""Every accumulator through its life: build, update, save, load, continue, merge; and the
arguments it refuses (non-finite thresholds, a top-k beyond the features)."""

from __future__ import annotations

import contextlib
import resource

import pytest
import torch

import supanalysis as sa

G = torch.Generator().manual_seed(11)
X = torch.randn(30, 6, generator=G, dtype=torch.float64)
X[4, 2] = float("nan")
Y = torch.randn(30, 4, generator=G, dtype=torch.float64) + X.nan_to_num(0.0)[:, :4]


def _codes(T: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(T)])
    idx[::3, -1] = -1
    return idx, torch.rand(T, k, generator=g, dtype=torch.float64) - 0.2


IA, VA = _codes(30, 6, 3, 1)
IB, VB = _codes(30, 4, 2, 2)

# kind -> (fresh accumulator, update with the tokens of slice s on device d)
KINDS = {
    "stats": (lambda: sa.ActivationStats(6, 0.1), lambda a, s, d="cpu": a.update(X[s].to(d))),
    "stats-sparse": (
        lambda: sa.ActivationStats(6, 0.1),
        lambda a, s, d="cpu": a.update_sparse(IA[s].to(d), VA[s].to(d)),
    ),
    "corr": (lambda: sa.CrossCorrelation(6, 4), lambda a, s, d="cpu": a.update(X.nan_to_num(0.0)[s].to(d), Y[s].to(d))),
    "corr-sparse": (
        lambda: sa.CrossCorrelation(6, 4),
        lambda a, s, d="cpu": a.update_sparse(IA[s].to(d), VA[s].to(d), IB[s].to(d), VB[s].to(d)),
    ),
    "coact": (lambda: sa.CoActivation(6, 0.1), lambda a, s, d="cpu": a.update(X[s].to(d))),
    "coact-sparse": (lambda: sa.CoActivation(6), lambda a, s, d="cpu": a.update_sparse(IA[s].to(d))),
    "sparse-coact": (
        lambda: sa.SparseCoActivation(6, 0.1),
        lambda a, s, d="cpu": a.update_sparse(IA[s].to(d), VA[s].to(d)),
    ),
}
FIRST, SECOND = slice(0, 26), slice(26, 30)


def _same_state(a, b, exact: bool = True) -> None:
    """Equal states; ``exact=False``: float moments to float64 rounding (a Chan merge and a
    streamed update round differently), counts still exactly."""
    sa_, sb = a.state_dict(), b.state_dict()
    assert sa_.keys() == sb.keys()
    for k in sa_:
        x, y = sa_[k].cpu(), sb[k].cpu()
        if exact or not x.is_floating_point():
            assert torch.equal(x, y), k
        else:
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_loaded_accumulator_continues_exactly(tmp_path, kind):
    make, feed = KINDS[kind]
    whole = make()
    feed(whole, FIRST)
    feed(whole, SECOND)
    part = make()
    feed(part, FIRST)
    part.save(tmp_path / "acc.safetensors")
    back = type(part).load(tmp_path / "acc.safetensors")  # no device: adopts the next input's
    assert back.n_tokens == 26
    feed(back, SECOND)
    assert back.n_tokens == 30
    _same_state(back, whole)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_loaded_accumulator_follows_its_next_input_to_the_gpu(tmp_path, kind):
    make, feed = KINDS[kind]
    whole = make()
    feed(whole, FIRST)
    feed(whole, SECOND)
    part = make()
    feed(part, FIRST)
    part.save(tmp_path / "acc.safetensors")
    back = type(part).load(tmp_path / "acc.safetensors")
    feed(back, SECOND, "cuda")
    assert back.device.type == "cuda" and back.n_tokens == 30
    _same_state(back, whole, exact=False)  # the GPU kernels round their batch differently


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_load_state_dict_then_update_and_merge_continue_exactly(kind):
    make, feed = KINDS[kind]
    whole = make()
    feed(whole, FIRST)
    feed(whole, SECOND)
    first = make()
    feed(first, FIRST)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    feed(resumed, SECOND)
    _same_state(resumed, whole)
    second = make()
    feed(second, SECOND)
    _same_state(first.merge(second), whole, exact=False)


@pytest.mark.parametrize("cls", [sa.ActivationStats, sa.CoActivation, sa.SparseCoActivation])
@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -float("inf"), "0.1", None, True])
def test_non_finite_or_non_real_thresholds_are_refused(cls, threshold):
    with pytest.raises(ValueError, match="threshold must be a finite real number"):
        cls(5, threshold)


@pytest.mark.parametrize("cls", [sa.ActivationStats, sa.CoActivation, sa.SparseCoActivation])
def test_finite_thresholds_of_any_real_type_are_kept(cls):
    import numpy as np

    for thr in (0, -3, 0.25, np.float32(0.5), 1e300):
        assert cls(5, thr).threshold == float(thr)


@contextlib.contextmanager
def _bounded_memory(extra: int = 1 << 30):
    """Cap the address space at its current size + ``extra``: an allocation sized by a huge
    argument fails fast instead of waking the out-of-memory killer."""
    with open("/proc/self/statm") as fh:
        current = int(fh.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (current + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize("cls", [sa.CoActivation, sa.SparseCoActivation])
def test_top_partners_clamps_k_to_the_other_features(cls):
    idx, _ = _codes(40, 5, 3, 3)
    acc = cls(5).update_sparse(idx)
    every_i, every_v = acc.top_partners(4, "jaccard")
    with _bounded_memory():
        huge_i, huge_v = acc.top_partners(10**9, "jaccard")
    assert huge_i.shape == huge_v.shape == (5, 4)
    assert torch.equal(huge_i, every_i) and torch.equal(huge_v, every_v)
    one_i, one_v = cls(1).update_sparse(torch.zeros(3, 1, dtype=torch.long)).top_partners(3)
    assert one_i.shape == one_v.shape == (1, 0)  # a single feature has no partner
    for k in (0, -1, 1.5, True, None, "2"):
        with pytest.raises(ValueError, match="k must be a positive int"):
            acc.top_partners(k)


def test_merge_refuses_another_kind_or_configuration():
    with pytest.raises(TypeError, match="must be a CoActivation"):
        sa.CoActivation(3).merge(sa.SparseCoActivation(3))
    with pytest.raises(ValueError, match=r"cannot merge CoActivation\(n=3, threshold=0.5\)"):
        sa.CoActivation(3).merge(sa.CoActivation(3, 0.5))
    with pytest.raises(ValueError, match="cannot merge SparseCoActivation"):
        sa.SparseCoActivation(3).merge(sa.SparseCoActivation(4))
    # The precision belongs to the updates: accumulators of either precision merge.
    sa.CrossCorrelation(3, 2).merge(sa.CrossCorrelation(3, 2, precision="bf16"))


def test_repr_names_kind_configuration_count_and_device():
    assert repr(sa.ActivationStats(3, 0.5).update(torch.ones(2, 3))) == (
        "ActivationStats(n_features=3, threshold=0.5, n_tokens=2, device=cpu)"
    )
    r = repr(sa.SparseCoActivation(4).update_sparse(torch.tensor([[0, 1], [1, 2]])))
    assert r == "SparseCoActivation(n=4, threshold=0.0, n_tokens=2, device=cpu, n_pairs=2)"
    assert "precision='bf16'" in repr(sa.CrossCorrelation(2, 2, precision="bf16"))


def test_to_moves_the_state_and_keeps_it_there():
    stats = sa.ActivationStats(3).update(torch.randn(5, 3))
    assert stats.to("cpu") is stats and stats.n_tokens == 5
    for acc in (stats, sa.CoActivation(3), sa.CrossCorrelation(3, 2), sa.SparseCoActivation(3)):
        acc.to("meta")  # no data: only the device of the state is checked below
        assert acc.device == torch.device("meta")
        with pytest.raises(ValueError, match="state is on meta"):
            if isinstance(acc, sa.CrossCorrelation):
                acc.update(torch.randn(5, 3), torch.randn(5, 2))
            elif isinstance(acc, sa.SparseCoActivation):
                acc.update_sparse(torch.zeros(5, 1, dtype=torch.long))
            else:
                acc.update(torch.randn(5, 3))
