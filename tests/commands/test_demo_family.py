"""The demo trains its four models side by side, one thread each: the same weights as one by one."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file

from supanalysis import demo
from supanalysis.data import stdlib_corpus

TINY = demo.DemoSize(
    200_000, (1, 16), (2, 8), demo.Schedule(6, 3e-3, 2), demo.Schedule(8, 3e-3, 2), 1_000, 2, 1_000, 1_000, 1_000, 10
)


def _weights(spec) -> dict:
    from pathlib import Path

    (path,) = Path(spec.path).glob("*.safetensors")
    return load_file(str(path))


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    return stdlib_corpus(TINY.corpus_bytes)


def test_side_by_side_training_equals_one_by_one(tmp_path, corpus, monkeypatch):
    side = demo.train_family(str(tmp_path / "side"), corpus, TINY, seed=3, progress=False)
    monkeypatch.setattr(demo, "_cores", lambda: 1)
    one = demo.train_family(str(tmp_path / "one"), corpus, TINY, seed=3, progress=False)
    assert [(s.shape, s.seed) for s in side] == [(s.shape, s.seed) for s in one]
    assert [s.seed for s in side] == ["0", "0", "1", "1"] and side[0].shape != side[1].shape
    for a, b in zip(side, one):
        wa, wb = _weights(a), _weights(b)
        assert wa.keys() == wb.keys()
        assert all(wa[k].equal(wb[k]) for k in wa), a.name
    # The seeds of a shape are different models.
    w0, w1 = _weights(side[0]), _weights(side[2])
    assert not all(w0[k].equal(w1[k]) for k in w0)
