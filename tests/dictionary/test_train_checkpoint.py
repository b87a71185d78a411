"""TopK trainer checkpoints: a kill at any write resumes to the uninterrupted SAE; corrupt
files are refused with their path."""

from __future__ import annotations

import json

import pytest
import torch

from supanalysis import durable
from supanalysis.dictionary import TopKTrainConfig, load_saelens, train_topk_sae
from supanalysis.dictionary.train_checkpoint import STATE_JSON

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

N_TOKENS = 6 * 256


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(48, 16, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    return [((torch.rand(256, 48, generator=g) < 0.06) * torch.rand(256, 48, generator=g)) @ dirs + 0.3
            for _ in range(6)]  # fmt: skip


def _cfg() -> TopKTrainConfig:
    # Short windows so AuxK and resampling both act inside the few steps; checkpoints fall
    # inside a logging window, so its partial sums must survive a resume.
    return TopKTrainConfig(batch_size=128, log_every=2, checkpoint_every=384, dead_after_tokens=256,
                           resample_after_tokens=512, decay_start=0.9)  # fmt: skip


def _train(data, folder=None):
    return train_topk_sae(data, None, 256, 2, N_TOKENS, config=_cfg(), checkpoint_dir=folder, progress=False)


class _Killed(Exception):
    pass


def _kill_after(monkeypatch, limit: int) -> list[int]:
    """Make the ``limit``-th durable write and later ones raise, as a killed process would
    stop there; returns a one-element counter of the writes attempted."""
    real, count = durable.durable_write, [0]

    def write(path, fn):
        count[0] += 1
        if count[0] > limit:
            raise _Killed(str(path))
        return real(path, fn)

    monkeypatch.setattr(durable, "durable_write", write)
    return count


def test_kill_at_every_write_boundary_resumes_to_the_same_sae(tmp_path, monkeypatch):
    data = _data()
    straight = _train(data)
    assert straight.history[-1]["resampled"] > 0 and any(h["aux_loss"] > 0 for h in straight.history)
    with monkeypatch.context() as m:
        total = _kill_after(m, 10**9)
        _train(data, tmp_path / "count")
    assert total[0] >= 20  # four checkpoints of several files each
    for i in range(total[0]):
        folder = tmp_path / f"kill{i}"
        with monkeypatch.context() as m:
            _kill_after(m, i)
            with pytest.raises(_Killed):
                _train(data, folder)
        resumed = _train(data, folder)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(resumed.dictionary, name), getattr(straight.dictionary, name)), (i, name)
        assert resumed.history == straight.history, i
        assert not [p for p in folder.rglob("*") if durable.TEMP_MARK in p.name]
    assert torch.equal(load_saelens(tmp_path / "kill0").W_dec, straight.dictionary.W_dec)


def test_a_flipped_bit_in_a_finished_checkpoint_is_refused(tmp_path):
    data = _data()
    _train(data, tmp_path)
    state = json.loads((tmp_path / STATE_JSON).read_text())
    for path in (tmp_path / "sae_weights.safetensors", tmp_path / state["step_dir"] / "sae_weights.safetensors"):
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0x10
        path.write_bytes(bytes(raw))
        with pytest.raises(ValueError, match=str(path).replace(".", r"\.") + ".*sha256"):
            _train(data, tmp_path)
        raw[-3] ^= 0x10
        path.write_bytes(bytes(raw))
    assert _train(data, tmp_path).tokens == N_TOKENS


def test_a_truncated_trainer_state_is_refused_with_its_path(tmp_path):
    data = _data()
    _train(data, tmp_path)
    path = tmp_path / STATE_JSON
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match=str(path).replace(".", r"\.") + ".*truncated"):
        _train(data, tmp_path)


def test_an_edited_trainer_state_fails_its_checksum(tmp_path):
    data = _data()
    _train(data, tmp_path)
    path = tmp_path / STATE_JSON
    doc = json.loads(path.read_text())
    doc["state"]["tokens"] = 256
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="checksum"):
        _train(data, tmp_path)
