"""Token sources: memory-mapped files, text, fixed-length sequences, skipped positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from supanalysis.data import (
    TokenSequences,
    encode_bytes,
    open_tokens,
    stdlib_corpus,
    stdlib_source_files,
    text_tokens,
)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_and_npy_are_memory_mapped_and_chunked_in_order(tmp_path, dtype):
    tokens = (np.arange(1000) * 7 % 60000).astype(dtype)
    tokens.tofile(tmp_path / "t.bin")
    np.save(tmp_path / "t.npy", tokens)
    for arr in (open_tokens(tmp_path / "t.bin", dtype), open_tokens(tmp_path / "t.npy")):
        assert isinstance(arr, np.memmap) or isinstance(arr.base, np.memmap)
        assert arr.dtype == np.dtype(dtype) and np.array_equal(arr, tokens)
        seqs = TokenSequences(arr, seq_len=64, batch_size=5)
        batches = list(seqs)
        assert len(seqs) == 15 and seqs.n_tokens == 960
        assert [b.shape for b in batches] == [(5, 64)] * 3
        assert all(b.dtype == torch.int64 for b in batches)
        flat = torch.cat(batches).reshape(-1)
        assert torch.equal(flat, torch.from_numpy(tokens[:960].astype(np.int64)))
        assert torch.equal(torch.cat(list(seqs)), torch.cat(batches))  # deterministic


def test_open_tokens_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_tokens(tmp_path / "missing.bin", "uint16")
    (tmp_path / "t.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="dtype must be one of"):
        open_tokens(tmp_path / "t.bin")
    np.save(tmp_path / "f.npy", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="integers"):
        open_tokens(tmp_path / "f.npy")


def test_start_max_sequences_and_prepend():
    tokens = np.arange(100, dtype=np.uint16)
    seqs = TokenSequences(tokens, seq_len=10, batch_size=3, start=2, max_sequences=4)
    got = torch.cat(list(seqs))
    assert got.shape == (4, 10) and got[0, 0] == 20 and got[-1, -1] == 59
    bos = TokenSequences(tokens, seq_len=10, batch_size=4, prepend=999, max_sequences=2)
    got = next(iter(bos))
    assert got[:, 0].tolist() == [999, 999] and got[1, 1:].tolist() == list(range(9, 18))


def test_keep_mask_skips_bos_pad_and_first():
    ids = torch.tensor([[5, 1, 2, 0], [1, 5, 5, 3]])
    seqs = TokenSequences(np.zeros(8, np.uint16), seq_len=4, skip_ids=[5, 0])
    assert seqs.keep_mask(ids).tolist() == [[False, True, True, False], [True, False, False, True]]
    seqs = TokenSequences(np.zeros(8, np.uint16), seq_len=4, skip_first=True)
    assert seqs.keep_mask(ids)[:, 0].tolist() == [False, False]
    assert seqs.keep_mask(ids)[:, 1:].all()


def test_text_as_bytes(tmp_path):
    (tmp_path / "a.txt").write_text("héllo")
    (tmp_path / "b.txt").write_text("ok")
    tokens = text_tokens([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert tokens.dtype == np.uint8 and bytes(tokens) == "héllo\nok".encode()
    assert bytes(encode_bytes(["a", b"b"], separator=b"|")) == b"a|b"


def test_text_with_local_hf_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, "hello": 2, "world": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", unk_token="[UNK]"
                            ).save_pretrained(tmp_path / "tok")  # fmt: skip
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.txt").write_text("world foo")
    tokens = text_tokens([tmp_path / "a.txt", tmp_path / "b.txt"], tokenizer=tmp_path / "tok")
    assert tokens.tolist() == [2, 3, 1, 3, 0]
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        text_tokens(tmp_path / "a.txt", tokenizer=tmp_path / "gpt2")


def test_stdlib_corpus_is_deterministic_bytes():
    files = stdlib_source_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    corpus = stdlib_corpus(max_bytes=200_000)
    assert corpus.dtype == np.uint8 and len(corpus) == 200_000
    first = files[0].read_bytes() + b"\n"
    assert bytes(corpus[: len(first)]) == first[:200_000]
    assert np.array_equal(corpus, stdlib_corpus(max_bytes=200_000))
