"""C++ dense activation_stats on finite values whose float32 squares (or sums) overflow.

Values beyond ~1.8e19 have squares beyond float32's range and sums of a tile of values
near 3e38 overflow too; the float64 reference has neither problem. The C++ kernel must
agree with it to float32 accuracy (counts and extrema exactly), also for the normal
features beside them, for tiles that follow a huge one, and through ``ActivationStats``.
(float16 tops out at 65504, whose squares fit float32: only float32 and bfloat16 overflow.)
"""

from __future__ import annotations

import pytest
import torch

import supanalysis as sa
from supanalysis._backend import native
from supanalysis.ops.activation_stats import activation_stats_reference

FIELDS = ("finite_count", "fire_count", "mean", "m2", "max", "min", "active_sum", "l0")

pytestmark = pytest.mark.skipif(native() is None, reason="supanalysis._C is not built")


def extreme_batch(dtype: torch.dtype, big: float, T: int = 300, n: int = 141, seed: int = 0) -> torch.Tensor:
    """[T, n]: normal values, with +-big in some features' rows (first, middle and ragged lanes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(T, generator=g) < 0.5, -1.0, 1.0).double()
    for f in (0, 9, 70, 140):  # a vector lane, another vector, the ragged tail of the chunk
        x[:, f] = sign * big
    x[::7, 33] = big  # sparse spikes in an otherwise normal feature
    x[:140, 34] = big  # a huge first tile, then normal values (the next tile's shift)
    x[5, 35] = float("nan")  # a non-finite entry in a tile that also holds a huge value
    x[6, 35] = -big
    return x.to(dtype)


RTOL = 1e-5  # float32 tiles merged in float64: a few float32 ulps of each feature's scale


def check(x: torch.Tensor, thr: float = 0.0) -> None:
    got = dict(zip(FIELDS, native().activation_stats_cpu(x, thr)))
    ref = dict(zip(FIELDS, activation_stats_reference(x, thr)))
    for name in ("finite_count", "fire_count", "max", "min", "l0"):
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    for name in ("mean", "m2", "active_sum"):
        assert torch.isfinite(got[name]).all(), f"{name}: {got[name][~torch.isfinite(got[name])]}"
    x64 = torch.where(torch.isfinite(x), x, 0).double()
    scale = x64.abs().amax(0)  # each feature's largest |value|: the error yardstick
    err = {name: (got[name] - ref[name]).abs() for name in ("mean", "m2", "active_sum")}
    assert (err["mean"] <= RTOL * scale).all(), f"mean: {(err['mean'] / scale).max()} of max |x|"
    assert (err["m2"] <= RTOL * ref["m2"]).all(), f"m2: {(err['m2'] / ref['m2']).nanmax()} relative"
    fired = torch.where(x64 > thr, x64, 0).abs().sum(0)
    assert (err["active_sum"] <= RTOL * fired).all(), "active_sum"


@pytest.mark.parametrize("big", [3e19, -3e19, 1e30, 3e38], ids=["3e19", "-3e19", "1e30", "3e38"])
def test_float32_huge_values_match_reference(big: float) -> None:
    check(extreme_batch(torch.float32, big))


@pytest.mark.parametrize("big", [3e19, 1e30], ids=["3e19", "1e30"])
def test_bfloat16_huge_values_match_reference(big: float) -> None:
    check(extreme_batch(torch.bfloat16, big))


def test_strided_rows_with_huge_values() -> None:
    x = extreme_batch(torch.float32, 1e30, n=300)[:, 7:200]
    assert x.stride(0) == 300
    check(x, thr=0.5)


def test_streaming_variance_is_finite() -> None:
    x = extreme_batch(torch.float32, 2e19)
    s = sa.ActivationStats(x.shape[1], backend="cpp")
    for part in x.split(77):
        s.update(part)
    ref = activation_stats_reference(x, 0.0)
    var = s.var
    assert torch.isfinite(var).all(), var[~torch.isfinite(var)]
    torch.testing.assert_close(var, ref[3] / ref[0].double(), rtol=RTOL, atol=0)
