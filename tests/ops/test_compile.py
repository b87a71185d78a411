"""Every registered op is a well-formed torch.library op and traces under torch.compile.

Parametrised from the registry: a new op is checked here by registering it.
"""

from __future__ import annotations

import pytest
import torch

from supanalysis.ops.registry import Example, OpEntry, entries

ENTRIES = entries()
EXAMPLES = [Example(T=33, n=7, k=4), Example(T=1, n=1, k=1), Example(T=0, n=5, k=3)]


def op_args(entry: OpEntry, example: Example, backend: str = "") -> tuple:
    """The example's arguments with ``backend`` in the schema's place."""
    args = list(entry.example(example))
    args.insert(entry.arg_names.index("backend"), backend)
    return tuple(args)


def clone(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def outputs(out, args: tuple) -> list[torch.Tensor]:
    """What an op produced: its results and the arguments it mutated (all tensors)."""
    got = [t for t in (out or []) if isinstance(t, torch.Tensor)]
    return got + [a for a in args if isinstance(a, torch.Tensor)]


def test_registry_holds_every_op():
    assert {"activation_stats", "interference", "cross_moments_update", "best_match"} <= set(ENTRIES)
    defined = {
        n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("supanalysis::")
    }
    assert defined == set(ENTRIES)  # every supanalysis op comes from the registry


@pytest.mark.parametrize("example", EXAMPLES, ids=["33x7", "1x1", "empty"])
@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_opcheck(name, example):
    entry = ENTRIES[name]
    torch.library.opcheck(entry.op, op_args(entry, example), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_compile_fullgraph_matches_eager(name):
    entry = ENTRIES[name]
    args = op_args(entry, Example(T=17, n=6, k=3))
    torch._dynamo.reset()

    def call(*a):
        return entry.op(*a)

    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    eager_args, compiled_args = clone(args), clone(args)
    want = outputs(call(*eager_args), eager_args)
    got = outputs(compiled(*compiled_args), compiled_args)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w) or torch.allclose(g, w, equal_nan=True), name


def test_compile_fullgraph_composes_ops():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def stats_and_interference(x, W):
        s = torch.ops.supanalysis.activation_stats(x, 0.0, "")
        r = torch.ops.supanalysis.interference(W, None, 0, 0, "", "ieee")
        return s[2] * 2, r[3].sum()

    x, W = torch.randn(40, 6), torch.randn(10, 4)
    mean2, dsum = stats_and_interference(x, W)
    assert torch.allclose(mean2, x.double().mean(0) * 2, atol=1e-6)
    assert dsum.item() > 0


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_opcheck_interference_with_v(precision):
    W, V = torch.randn(20, 5), torch.randn(6, 5)
    args = (W, V, 2, 0, "", precision)
    op = torch.ops.supanalysis.interference.default
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_opcheck_cross_moments_bf16():
    entry = ENTRIES["cross_moments_update"]
    args = list(op_args(entry, Example(T=33, n=7, k=4)))
    args[-1] = "bf16"
    torch.library.opcheck(entry.op, tuple(args), test_utils=("test_schema", "test_faketensor"))
