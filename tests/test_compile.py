"""The custom ops are well-formed torch.library ops and trace under torch.compile."""

from __future__ import annotations

import pytest
import torch

import supanalysis  # noqa: F401  (registers the ops)


def _ops_and_args():
    x = torch.randn(33, 7)
    idx = torch.stack([torch.randperm(7)[:3] for _ in range(33)])
    W = torch.randn(20, 5)
    com = torch.zeros(7, 4, dtype=torch.float64)
    xb = torch.randn(33, 4)
    return [
        (torch.ops.supanalysis.activation_stats.default, (x, 0.0, "")),
        (torch.ops.supanalysis.activation_stats_sparse.default, (idx, torch.rand(33, 3), 7, 0.0, "")),
        (torch.ops.supanalysis.interference.default, (W, None, 2, 0, "", "ieee")),
        (torch.ops.supanalysis.interference.default, (W, torch.randn(6, 5), 2, 0, "", "tf32")),
        *[
            (
                torch.ops.supanalysis.cross_moments_update.default,
                (
                    com.clone(),
                    10,
                    torch.zeros(7, dtype=torch.float64),
                    torch.zeros(4, dtype=torch.float64),
                    x,
                    xb,
                    "",
                    p,
                ),
            )
            for p in ("ieee", "bf16")
        ],
        (
            torch.ops.supanalysis.best_match.default,
            (
                torch.randn(7, 4, dtype=torch.float64),
                torch.ones(7, dtype=torch.float64),
                torch.ones(4, dtype=torch.float64),
                "",
            ),
        ),
        (torch.ops.supanalysis.coactivation_update.default, (torch.zeros(7, 7, dtype=torch.int64), x, 0.0, "")),
        (torch.ops.supanalysis.coactivation_update_sparse.default, (torch.zeros(7, 7, dtype=torch.int64), idx, "")),
        (
            torch.ops.supanalysis.sparse_outer_update.default,
            (torch.zeros(7, 5, dtype=torch.float64), idx, torch.rand(33, 3), idx % 5, torch.rand(33, 3), ""),
        ),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    op, args = _ops_and_args()[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def stats_and_interference(x, W):
        s = torch.ops.supanalysis.activation_stats(x, 0.0, "")
        r = torch.ops.supanalysis.interference(W, None, 0, 0, "", "ieee")
        return s[2] * 2, r[3].sum()

    x, W = torch.randn(40, 6), torch.randn(10, 4)
    mean2, dsum = stats_and_interference(x, W)
    assert torch.allclose(mean2, x.double().mean(0) * 2, atol=1e-6)
    assert dsum.item() > 0
