"""Hostile inputs to the token, config and report loaders, and no code run from any file:
each malformed file or field raises a clear error naming it (see tests/test_fuzz.py for the
dictionary and model loaders), never crashes, allocates without bound or runs code.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fuzzing import (
    JSON_VALUES,
    ROOT,
    _write,
    call_ok_or_clear,
    expect_clear,
    fuzz,
)
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from supanalysis.config import TestConfig
from supanalysis.data import TokenSequences, open_tokens
from supanalysis.models import TinyTransformer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ------------------------------------------------------------------ token sources


@fuzz(100)
@given(
    dtype=st.sampled_from(["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]),
    data=st.data(),
)
def test_token_ids_out_of_vocab_or_negative(base, dtype, data):
    info = np.iinfo(dtype)
    vocab = 50
    ids = data.draw(
        st.lists(
            st.one_of(st.integers(0, vocab - 1), st.integers(max(info.min, -(2**63)), min(info.max, 2**64 - 1))),
            min_size=1,
            max_size=40,
        )
    )
    arr = np.asarray(ids, dtype=dtype)
    path = base / "ids.npy"
    np.save(path, arr)
    tokens = open_tokens(path)
    seqs = TokenSequences(tokens, seq_len=4, batch_size=3, vocab_size=vocab)
    used = arr[: len(seqs) * 4]
    bad = [int(v) for v in used if not 0 <= int(v) < vocab]
    if bad:
        expect_clear(lambda: list(seqs), "token id")
    else:
        for batch in seqs:
            assert batch.dtype == torch.int64 and int(batch.min()) >= 0 and int(batch.max()) < vocab
    # Without a vocabulary, negative (or wrapped uint64) ids are still refused.
    if any(int(v) < 0 or int(v) >= 2**63 for v in used):
        expect_clear(lambda: list(TokenSequences(tokens, seq_len=4)), "token id")


@fuzz(40)
@given(cut=st.floats(0, 1, exclude_max=True), suffix=st.sampled_from([".npy", ".bin"]))
def test_truncated_or_empty_token_files(base, cut, suffix):
    arr = np.arange(37, dtype=np.uint16)
    if suffix == ".npy":
        np.save(base / "full.npy", arr)
        raw = (base / "full.npy").read_bytes()
    else:
        raw = arr.tobytes()
    path = _write(base, "cut" + suffix, raw[: int(cut * len(raw))])
    ok, _ = call_ok_or_clear(lambda: open_tokens(path, "uint16"), path)
    # A raw file cut at an even length is a valid shorter file; anything else is refused.
    assert ok == (suffix == ".bin" and len(path.read_bytes()) % 2 == 0 and len(path.read_bytes()) > 0)


def test_token_files_with_bad_dtypes(base):
    cases = {
        "float.npy": np.ones(5),
        "bool.npy": np.ones(5, dtype=bool),
        "complex.npy": np.ones(5, dtype=complex),
        "empty.npy": np.zeros(0, dtype=np.int32),
        "str.npy": np.array(["a", "b"]),
    }
    for name, arr in cases.items():
        np.save(base / name, arr)
        expect_clear(lambda n=name: open_tokens(base / n), name)
    marker = base / "npy-pwned"
    (base / "object.npy").write_bytes(b"")
    np.save(base / "object.npy", np.array([_PickleMarker(marker)], dtype=object), allow_pickle=True)
    expect_clear(lambda: open_tokens(base / "object.npy"), "object.npy")
    assert not marker.exists()
    expect_clear(lambda: open_tokens(base / "float.npy", "uint16"), "float.npy")
    expect_clear(lambda: open_tokens(_write(base, "odd.bin", b"abc"), "uint16"), "odd.bin")
    expect_clear(lambda: open_tokens(base / "odd.bin"), "dtype")
    expect_clear(lambda: open_tokens(base / "odd.bin", "float32"), "dtype")
    expect_clear(lambda: open_tokens(base / "missing.npy"), "missing.npy")
    for kw in ({"seq_len": 2.5}, {"seq_len": "4"}, {"batch_size": 0}, {"start": -1}, {"max_sequences": -1},
               {"prepend": -1}, {"vocab_size": 0}, {"seq_len": True}):  # fmt: skip
        expect_clear(lambda kw=kw: TokenSequences(np.arange(8), **{"seq_len": 4, **kw}), next(iter(kw)))


class _PickleMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pipeline_refuses_negative_token_ids(base):
    from supanalysis import measure
    from supanalysis.config import ModelSpec

    torch.manual_seed(0)
    models = [TinyTransformer(n_layers=1, d_model=8, n_heads=2, d_ff=16, vocab_size=11, n_ctx=8) for _ in range(2)]
    ids = np.arange(400, dtype=np.int32) % 11
    ids[5] = -3
    np.save(base / "neg.npy", ids)
    cfg = TestConfig(
        model_a=ModelSpec(name="A"),
        model_b=ModelSpec(name="B"),
        tokens=str(base / "neg.npy"),
        seq_len=8,
        batch_size=4,
        eval_tokens=64,
        stats_tokens=64,
        match_tokens=64,
        bootstrap=10,
    )
    expect_clear(lambda: measure(cfg, *models, progress=False), "token id")


# ------------------------------------------------------------------ config files

CONFIG_FIELDS = {
    "": ["tokens", "token_dtype", "seq_len", "batch_size", "eval_tokens", "stats_tokens", "match_tokens",
         "match_max_bytes", "any_layer", "activation_threshold", "bootstrap", "seed", "device", "backend",
         "unknown_key"],
    "model_a": ["path", "name", "sites", "dictionary", "unknown_key"],
    "sae": ["expansion", "k", "tokens", "batch_size", "lr", "unknown_key"],
    "thresholds": ["tau", "phi", "density_floor", "params_tolerance", "loss_tolerance", "C", "unknown_key"],
}  # fmt: skip

GOOD_CONFIG = {
    "tokens": "tokens.npy", "seq_len": 16, "stats_tokens": 1000, "match_tokens": 500,
    "model_a": {"path": "A", "dictionary": "neuron"}, "model_b": {"path": "B"},
    "sae": {"k": 4}, "thresholds": {"tau": 0.5},
}  # fmt: skip


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: An independent statement of what each field accepts, to judge whatever loaded.
ACCEPTS = {
    "tokens": lambda v: isinstance(v, str),
    "sae.tokens": lambda v: is_int(v) and v >= 1,
    "token_dtype": lambda v: v is None or v in ("uint8", "uint16", "uint32", "int32"),
    "seq_len": lambda v: is_int(v) and v >= 1,
    "batch_size": lambda v: is_int(v) and v >= 1,
    "eval_tokens": lambda v: is_int(v) and v >= 1,
    "stats_tokens": lambda v: is_int(v) and v >= 500,
    "match_tokens": lambda v: is_int(v) and 0 <= v <= 1000,
    "match_max_bytes": lambda v: is_int(v) and v >= 1,
    "any_layer": lambda v: isinstance(v, bool),
    "activation_threshold": lambda v: _is_num(v) and v == v,
    "bootstrap": lambda v: is_int(v) and v >= 1,
    "seed": is_int,
    "device": lambda v: v is None or isinstance(v, str),
    "backend": lambda v: v is None or v in ("auto", "reference", "cpp", "triton", "cuda"),
    "path": lambda v: isinstance(v, str),
    "name": lambda v: isinstance(v, str),
    "sites": lambda v: v is None or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
    "dictionary": lambda v: (
        isinstance(v, str)
        or (isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()))
    ),
    "expansion": lambda v: is_int(v) and v >= 1,
    "k": lambda v: is_int(v) and v >= 1,
    "lr": lambda v: v is None or (_is_num(v) and 0 < v < float("inf")),
    "tau": lambda v: _is_num(v) and -1 <= v <= 1,
    "phi": lambda v: _is_num(v) and 0 <= v <= 1,
    "density_floor": lambda v: _is_num(v) and 0 <= v < 1,
    "params_tolerance": lambda v: _is_num(v) and 0 <= v < float("inf"),
    "loss_tolerance": lambda v: _is_num(v) and 0 <= v < float("inf"),
    "C": lambda v: _is_num(v) and 0 < v < float("inf"),
    "unknown_key": lambda v: False,
}


@fuzz(200)
@given(data=st.data())
def test_fuzzed_config_fields(base, data):
    section = data.draw(st.sampled_from(sorted(CONFIG_FIELDS)))
    field = data.draw(st.sampled_from(CONFIG_FIELDS[section]))
    value = data.draw(st.one_of(JSON_VALUES, st.sampled_from(["cpu", "auto", "uint16", "x.npy", ["resid_post.0"]])))
    cfg = json.loads(json.dumps(GOOD_CONFIG))
    (cfg[section] if section else cfg)[field] = value
    path = base / "fuzz.json"
    path.write_text(json.dumps(cfg))
    if field == "device" and isinstance(value, str):
        try:
            torch.device(value)
        except RuntimeError:
            ok, got = call_ok_or_clear(lambda: TestConfig.load(path))
            assert not ok
            return
    ok, got = call_ok_or_clear(lambda: TestConfig.load(path), path)
    accepts = ACCEPTS.get(f"{section}.{field}", ACCEPTS[field])
    assert ok == accepts(value), f"{section}.{field}={value!r}: {'loaded' if ok else got}"
    if not ok:
        assert field in str(got), str(got)


@fuzz(30)
@given(raw=st.binary(max_size=60), suffix=st.sampled_from([".toml", ".json"]))
def test_unparseable_config_files(base, raw, suffix):
    path = _write(base, "raw" + suffix, raw)
    ok, _ = call_ok_or_clear(lambda: TestConfig.load(path), path)
    assert not ok or raw.strip() in (b"", b"{}") or suffix == ".toml"


def test_config_files_by_hand(base):
    def toml(text):
        return _write(base, "hand.toml", text.encode())

    expect_clear(lambda: TestConfig.load(toml("tokens = ")), "hand.toml")
    expect_clear(lambda: TestConfig.load(toml("seq_len = true")), "seq_len")
    expect_clear(lambda: TestConfig.load(toml('any_layer = "no"')), "any_layer")
    expect_clear(lambda: TestConfig.load(toml("[thresholds]\nC = nan")), "C")
    expect_clear(lambda: TestConfig.load(toml("[thresholds]\nloss_tolerance = -0.1")), "loss_tolerance")
    expect_clear(lambda: TestConfig.load(toml("[model_a]\npath = 5")), "model_a.path")
    expect_clear(lambda: TestConfig.load(toml("[model_a]\ncolour = 'red'")), "colour")
    expect_clear(lambda: TestConfig.load(toml("model_a = 'x'")), "model_a")
    expect_clear(lambda: TestConfig.load(_write(base, "c.yaml", b"a: 1")), "toml")
    expect_clear(lambda: TestConfig.load(base / "none.toml"), "none.toml")
    ok = TestConfig.load(toml('tokens = "t.npy"\nseq_len = 16\n[model_a]\npath = "A"\n[thresholds]\ntau = 1\n'))
    assert ok.seq_len == 16 and ok.model_a.path == str(base / "A") and ok.tokens == str(base / "t.npy")


def test_report_loader_refuses_corrupt_json(base):
    from supanalysis.report import load_report

    folder = base / "report"
    folder.mkdir(exist_ok=True)
    (folder / "arrays.safetensors").write_bytes(b"")
    for raw in (b"[1]", b'{"schema": "other"}'):
        (folder / "report.json").write_bytes(raw)
        expect_clear(lambda: load_report(folder), "report.json")
    expect_clear(lambda: load_report(base / "no-report"), "report.json")


@pytest.mark.parametrize("which", ["json", "arrays"])
def test_report_loader_names_corrupt_files(base, which):
    from supanalysis.report import SCHEMA, load_report

    folder = base / f"report-{which}"
    folder.mkdir(exist_ok=True)
    save_file({"x": torch.zeros(2)}, str(folder / "arrays.safetensors"))
    (folder / "report.json").write_text(json.dumps({"schema": SCHEMA}))
    if which == "json":
        (folder / "report.json").write_bytes(b"{not json")
    else:
        (folder / "arrays.safetensors").write_bytes(b"\x00" * 3)
    expect_clear(lambda: load_report(folder), "report.json" if which == "json" else "arrays.safetensors")


# ------------------------------------------------------------------ no code from files

FORBIDDEN_CALLS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cPickle", "load"), ("cPickle", "loads"),
    ("dill", "load"), ("dill", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
    ("joblib", "load"), ("marshal", "load"), ("marshal", "loads"), ("shelve", "open"), ("jsonpickle", "decode"),
}  # fmt: skip


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Calls in ``source`` that can run code from data: unpickling, eval/exec, torch.load without
    weights_only=True, np.load(allow_pickle=True), yaml.load without a safe loader,
    trust_remote_code=True."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        kw = {k.arg: k.value for k in node.keywords}
        where = f"{filename}:{node.lineno}"

        def true(key, kw=kw):
            v = kw.get(key)
            return isinstance(v, ast.Constant) and v.value is True

        if isinstance(f, ast.Name) and name in ("eval", "exec"):
            found.append(f"{where}: {name}()")
        if (owner, name) in FORBIDDEN_CALLS:
            found.append(f"{where}: {owner}.{name}()")
        if owner == "torch" and name == "load" and not true("weights_only"):
            found.append(f"{where}: torch.load without weights_only=True")
        if (
            name == "load"
            and owner in ("np", "numpy")
            and "allow_pickle" in kw
            and not (isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False)
        ):
            found.append(f"{where}: np.load with allow_pickle not False")
        if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
            loader = kw.get("Loader")
            if name != "load" or not (isinstance(loader, ast.Attribute) and "Safe" in loader.attr):
                found.append(f"{where}: yaml.{name} without SafeLoader")
        if true("trust_remote_code"):
            found.append(f"{where}: trust_remote_code=True")
    return found


def test_unsafe_call_detector_catches_each_pattern():
    bad = [
        "pickle.load(f)", "pickle.loads(b)", "eval(text)", "exec(code)", "torch.load(p)",
        "torch.load(p, weights_only=False)", "np.load(p, allow_pickle=True)", "yaml.load(s)",
        "AutoModel.from_pretrained(p, trust_remote_code=True)", "marshal.loads(b)", "dill.load(f)",
    ]  # fmt: skip
    for src in bad:
        assert unsafe_calls(src), src
    good = ["torch.load(p, weights_only=True)", "np.load(p, mmap_mode='r')", "np.load(p, allow_pickle=False)",
            "model.eval()", "yaml.safe_load(s)", "json.load(f)"]  # fmt: skip
    for src in good:
        assert not unsafe_calls(src), src


def test_no_code_execution_from_files_in_the_package():
    files = [p for d in ("supanalysis", "bench", "kernels") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 10
    found = []
    for path in files:
        found += unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, "code could run from data files:\n" + "\n".join(found)
