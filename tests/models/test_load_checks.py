"""A Hugging Face config.json is checked against the safetensors headers before any model is built."""

from __future__ import annotations

import json
import time

import pytest

from supanalysis.models import load
from supanalysis.models.testing import save_tiny_hf

pytest.importorskip("transformers")


@pytest.mark.parametrize(("key", "value", "match"), [
    ("n_layer", 20_000, "n_layer=20000 but the weights hold 3 blocks"),
    ("n_layer", 10**6, "n_layer=1000000 but the weights hold 3 blocks"),
    ("n_embd", 10**6, "n_embd=1000000 but the token embedding"),
    ("vocab_size", 10**6, "vocab_size=1000000 but the token embedding"),
])  # fmt: skip
def test_absurd_config_refused_from_the_header_in_under_a_second(tmp_path, key, value, match):
    folder = save_tiny_hf("gpt2", tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, key: value}))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        load(folder)
    assert time.perf_counter() - start < 1.0


def test_corrupt_header_refused(tmp_path):
    folder = save_tiny_hf("gpt2", tmp_path / "m")
    (folder / "model.safetensors").write_bytes((2**60).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header length"):
        load(folder)
