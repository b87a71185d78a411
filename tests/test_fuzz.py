"""Hostile inputs to the loaders: every dictionary, model, token, config and report loader,
fed malformed files or fields, raises a clear error (ValueError, TypeError or
FileNotFoundError, naming the file or field), never crashes, allocates without bound or
runs code from a file. (Op and accumulator cases live in tests/ops and tests/accumulators.)
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from fuzzing import (
    JSON_VALUES,
    _malformed_bytes,
    bounded_memory,
    call_ok_or_clear,
    expect_clear,
    fuzz,
)
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from supanalysis.dictionary import Dictionary, load_dictionary, load_saelens, load_sparsify, save_dictionary
from supanalysis.models import TinyConfig, TinyTransformer, describe, load

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def dict_folders(base):
    torch.manual_seed(0)
    d = Dictionary(4, 8, "topk", k=2)
    with torch.no_grad():
        for p in d.parameters():
            p.normal_()
    d.log10_density = torch.full((8,), -2.0)
    return {"saelens": save_dictionary(d, base / "sae-saelens", "saelens"),
            "sparsify": save_dictionary(d, base / "sae-sparsify", "sparsify")}  # fmt: skip


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in dst.iterdir():
        f.unlink()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture(scope="module")
def tiny_folder(base):
    torch.manual_seed(0)
    return TinyTransformer(n_layers=1, d_model=8, n_heads=2, d_ff=16, vocab_size=11, n_ctx=8).save(base / "tiny")


@fuzz(80)
@given(data=_malformed_bytes(), which=st.sampled_from(["saelens", "sparsity", "sparsify", "tiny"]))
def test_malformed_safetensors_dictionaries_and_models(base, dict_folders, tiny_folder, data, which):
    if which == "tiny":
        folder, name, loader = tiny_folder, "model.safetensors", load
    else:
        fmt = "sparsify" if which == "sparsify" else "saelens"
        folder, loader = dict_folders[fmt], load_dictionary
        name = {"saelens": "sae_weights.safetensors", "sparsity": "sparsity.safetensors",
                "sparsify": "sae.safetensors"}[which]  # fmt: skip
    work = _copy_folder(folder, base / "malformed-folder")
    (work / name).write_bytes(data)
    expect_clear(lambda: loader(work), name)


# ------------------------------------------------------------------ dictionary folders

SAELENS_FIELDS = ["d_in", "d_sae", "k", "architecture", "activation_fn_str", "activation_fn_kwargs",
                  "apply_b_dec_to_input", "metadata", "normalize_activations", "hook_name"]  # fmt: skip
SPARSIFY_FIELDS = ["d_in", "k", "num_latents", "expansion_factor", "skip_connection", "multi_topk"]


def _check_loaded_dictionary(d) -> None:
    assert (d.d_in, d.n_features) == (4, 8)
    x = torch.randn(5, 4, dtype=d.W_enc.dtype)
    idx, val = d.encode(x, sparse=True)
    assert idx.shape[0] == 5 and bool(torch.isfinite(val).all())
    assert bool(torch.isfinite(d.decode(d.encode(x))).all())


@fuzz(150)
@given(fmt=st.sampled_from(["saelens", "sparsify"]), data=st.data())
def test_fuzzed_dictionary_cfg(base, dict_folders, fmt, data):
    src = dict_folders[fmt]
    cfg = json.loads((src / "cfg.json").read_text())
    field = data.draw(st.sampled_from(SAELENS_FIELDS if fmt == "saelens" else SPARSIFY_FIELDS))
    if data.draw(st.booleans()) and field in cfg:
        del cfg[field]
    else:
        cfg[field] = data.draw(JSON_VALUES)
    work = _copy_folder(src, base / f"cfg-{fmt}")
    (work / "cfg.json").write_text(json.dumps(cfg))
    loader = load_saelens if fmt == "saelens" else load_sparsify
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # normalize_activations values warn, by design
        ok, got = call_ok_or_clear(lambda: loader(work))
    if ok:
        _check_loaded_dictionary(got)
    else:
        msg = str(got)
        assert "cfg.json" in msg or ".safetensors" in msg, msg


@fuzz(30)
@given(raw=st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"[]", b"null", b"3", b'"cfg"', b"{", b"\xff"])))
def test_unparseable_dictionary_cfg(base, dict_folders, raw):
    work = _copy_folder(dict_folders["saelens"], base / "cfg-raw")
    (work / "cfg.json").write_bytes(raw)
    expect_clear(lambda: load_dictionary(work), "cfg.json")


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
@pytest.mark.parametrize("how", ["int", "nan", "inf", "bool", "transposed", "missing", "half"])
def test_dictionary_weights_with_bad_values(base, dict_folders, fmt, how):
    from safetensors.torch import load_file

    src = dict_folders[fmt]
    name = "sae_weights.safetensors" if fmt == "saelens" else "sae.safetensors"
    key = "W_enc" if fmt == "saelens" else "encoder.weight"
    tensors = load_file(str(src / name))
    t = tensors[key]
    tensors[key] = {
        "int": t.to(torch.int32),
        "bool": t > 0,
        "nan": t.clone().fill_(float("nan")),
        "inf": torch.where(t > 0, float("inf"), t),
        "transposed": t.T.contiguous(),
        "half": t.half(),
        "missing": None,
    }[how]
    if tensors[key] is None:
        del tensors[key]
    work = _copy_folder(src, base / f"weights-{fmt}")
    save_file(tensors, str(work / name))
    if how == "half":  # a lower-precision checkpoint is valid
        _check_loaded_dictionary(load_dictionary(work))
    else:
        expect_clear(lambda: load_dictionary(work), name, key)


def _pickle_bomb(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when (and only when) it is unpickled."""

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Bomb())


def test_dictionary_folder_extra_files_are_never_executed(base, dict_folders):
    marker = base / "dict-pwned"
    work = _copy_folder(dict_folders["saelens"], base / "extra-files")
    for name in ("sae_weights.pt", "pytorch_model.bin", "cfg.pkl", "sparsity.npy", "sae_weights.ckpt"):
        (work / name).write_bytes(_pickle_bomb(marker))
    (work / "notes.txt").write_text("hello")
    _check_loaded_dictionary(load_dictionary(work))
    assert not marker.exists()
    # Only pickled weights: refused, never unpickled.
    (work / "sae_weights.safetensors").unlink()
    expect_clear(lambda: load_dictionary(work), "cannot tell the format")
    expect_clear(lambda: load_saelens(work), "sae_weights.safetensors")
    assert not marker.exists()
    # Both formats' weights at once is ambiguous.
    both = _copy_folder(dict_folders["saelens"], base / "both-formats")
    (both / "sae.safetensors").write_bytes((dict_folders["sparsify"] / "sae.safetensors").read_bytes())
    expect_clear(lambda: load_dictionary(both), "cannot tell the format")
    expect_clear(lambda: load_dictionary(base / "no-such-folder"))
    expect_clear(lambda: load_dictionary(dict_folders["saelens"], format="pickle"), "pickle")


# ------------------------------------------------------------------ models

TINY_FIELDS = ["n_layers", "d_model", "n_heads", "d_ff", "vocab_size", "n_ctx", "tie_embeddings", "init_std",
               "model_type"]  # fmt: skip


@fuzz(120)
@given(data=st.data())
def test_fuzzed_tiny_config(base, tiny_folder, data):
    cfg = json.loads((tiny_folder / "config.json").read_text())
    field = data.draw(st.sampled_from(TINY_FIELDS))
    value = data.draw(JSON_VALUES)
    if field == "model_type" and isinstance(value, str):
        # Never a real Hugging Face type: transformers would build its full-size default model.
        value = "bogus-" + value
    cfg[field] = value
    work = _copy_folder(tiny_folder, base / "tiny-cfg")
    (work / "config.json").write_text(json.dumps(cfg))
    with bounded_memory():
        ok, got = call_ok_or_clear(lambda: load(work))
    if ok:
        assert isinstance(got, TinyTransformer)
        assert got(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 11)
    else:
        msg = str(got)
        assert "config.json" in msg or "model.safetensors" in msg or str(work) in msg, msg


@fuzz(20)
@given(raw=st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"[]", b"{", b"\xff", b'{"model_type": 3}'])))
def test_unparseable_model_config(base, tiny_folder, raw):
    work = _copy_folder(tiny_folder, base / "tiny-raw")
    (work / "config.json").write_bytes(raw)
    expect_clear(lambda: load(work), "config.json")


def test_tiny_weights_not_matching_config(base, tiny_folder):
    from safetensors.torch import load_file

    good = load_file(str(tiny_folder / "model.safetensors"))
    cases = {
        "missing": {k: v for k, v in good.items() if k != "ln_f.bias"},
        "extra": {**good, "evil": torch.zeros(1)},
        "shape": {**good, "ln_f.bias": torch.zeros(3)},
        "nan": {**good, "ln_f.bias": torch.full((8,), float("nan"))},
    }
    work = _copy_folder(tiny_folder, base / "tiny-weights")
    for tensors in cases.values():
        save_file(tensors, str(work / "model.safetensors"))
        expect_clear(lambda: load(work), "model.safetensors")
    # A config that would need terabytes is refused from the file header, before allocating.
    cfg = json.loads((tiny_folder / "config.json").read_text())
    _copy_folder(tiny_folder, work)
    for big in ({"n_layers": 10**7}, {"d_model": 2**40, "n_heads": 1}, {"vocab_size": 10**12}):
        (work / "config.json").write_text(json.dumps({**cfg, **big}))
        with bounded_memory():
            expect_clear(lambda: load(work), "model.safetensors")
    (work / "model.safetensors").unlink()
    expect_clear(lambda: load(work), "model.safetensors")
    expect_clear(lambda: load(base / "no-such-model"), "no-such-model")


@pytest.fixture(scope="module")
def hf_folder(base):
    pytest.importorskip("transformers")
    from supanalysis.models.testing import TinyHFShape, save_tiny_hf

    shape = TinyHFShape(n_layers=1, d_model=8, n_heads=2, d_ff=16, vocab_size=11, n_ctx=8)
    return save_tiny_hf("gpt2", base / "hf-gpt2", shape)


def test_hf_folder_hostile_variants(base, hf_folder):
    marker = base / "hf-pwned"
    cfg = json.loads((hf_folder / "config.json").read_text())
    work = _copy_folder(hf_folder, base / "hf-work")
    # More layers in config.json than in the weights: transformers would fill them randomly.
    (work / "config.json").write_text(json.dumps({**cfg, "n_layer": 2}))
    expect_clear(lambda: load(work), "n_layer=2")
    # Wrong types and wrong widths.
    for bad in ({"n_embd": "8"}, {"n_embd": 16}, {"model_type": "bogus-arch"}, {"model_type": ["gpt2"]}):
        (work / "config.json").write_text(json.dumps({**cfg, **bad}))
        expect_clear(lambda: load(work), work)
    # Remote code named by auto_map is never imported.
    (work / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (work / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "evil.Model"}}))
    call_ok_or_clear(lambda: load(work))
    assert not marker.exists()
    # Only a pickled checkpoint: refused without unpickling it.
    (work / "config.json").write_text(json.dumps(cfg))
    (work / "model.safetensors").unlink()
    (work / "pytorch_model.bin").write_bytes(_pickle_bomb(marker))
    expect_clear(lambda: load(work), "safetensors")
    assert not marker.exists()
    # Truncated weights.
    _copy_folder(hf_folder, work)
    raw = (hf_folder / "model.safetensors").read_bytes()
    (work / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    expect_clear(lambda: load(work), work)


def test_describe_refuses_unknown_architectures():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3))
    expect_clear(lambda: describe(net), "Sequential")
    expect_clear(lambda: describe(net, arch="bogus"), "bogus")
    with pytest.raises(ValueError, match="TinyConfig"):
        TinyConfig(n_layers=True)
    with pytest.raises(ValueError, match="init_std"):
        TinyConfig(init_std=float("nan"))
