"""Sites, the capture context manager and the streaming ActivationSource."""

from __future__ import annotations

import tracemalloc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from supanalysis.capture import ActivationSource, capture
from supanalysis.data import TokenSequences
from supanalysis.models import TinyConfig, TinyTransformer, load
from supanalysis.models.arch import arch_of, get_module
from supanalysis.models.testing import HF_FAMILIES, TinyHFShape, save_tiny_hf
from supanalysis.sites import resolve_site, valid_site_names

SHAPE = TinyHFShape()


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _tiny(n_layers=3, d_model=16, d_ff=40, n_ctx=16) -> TinyTransformer:
    torch.manual_seed(0)
    cfg = TinyConfig(n_layers=n_layers, d_model=d_model, n_heads=2, d_ff=d_ff, n_ctx=n_ctx)
    return TinyTransformer(cfg).eval()


def _n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module", params=HF_FAMILIES)
def hf_model(request, tmp_path_factory):
    pytest.importorskip("transformers")
    folder = save_tiny_hf(request.param, tmp_path_factory.mktemp(request.param))
    return load(folder)


def test_resid_matches_hidden_states_exactly(hf_model):
    """resid_pre.l == hidden_states[l]; resid_post.l == hidden_states[l+1] except the last
    block, whose hidden_states entry has the final norm applied: that is ln_final, and
    resid_post.{L-1} is the pre-norm block output (TransformerLens' convention)."""
    L = SHAPE.n_layers
    ids = torch.randint(0, SHAPE.vocab_size, (2, 9))
    sites = [f"resid_pre.{l}" for l in range(L)] + [f"resid_post.{l}" for l in range(L)]
    with torch.no_grad(), capture(hf_model, [*sites, "ln_final"]) as cache:
        hs = hf_model(ids, output_hidden_states=True).hidden_states
    assert len(hs) == L + 1
    for l in range(L):
        assert cache[f"resid_pre.{l}"].dtype == hs[l].dtype
        assert torch.equal(cache[f"resid_pre.{l}"], hs[l])
    for l in range(L - 1):
        assert torch.equal(cache[f"resid_post.{l}"], hs[l + 1])
    assert torch.equal(cache["ln_final"], hs[L])
    assert not torch.equal(cache[f"resid_post.{L - 1}"], hs[L])
    final_norm = get_module(hf_model, arch_of(hf_model).final_norm)
    with torch.no_grad():
        assert torch.equal(final_norm(cache[f"resid_post.{L - 1}"]), hs[L])


def test_mlp_post_width_and_aliases(hf_model):
    ids = torch.randint(0, SHAPE.vocab_size, (2, 5))
    blocks = arch_of(hf_model).blocks
    sites = ["mlp_post.1", "blocks.1.mlp.hook_post", "resid_post.-1", "blocks.2.hook_resid_post",
             "attn_out.0", "blocks.0.hook_attn_out", "mlp_out.0", f"{blocks}.2"]  # fmt: skip
    with torch.no_grad(), capture(hf_model, sites) as cache:
        hf_model(ids)
    assert cache["mlp_post.1"].shape == (2, 5, SHAPE.d_ff)
    assert torch.equal(cache["mlp_post.1"], cache["blocks.1.mlp.hook_post"])
    assert torch.equal(cache["resid_post.-1"], cache["blocks.2.hook_resid_post"])
    assert torch.equal(cache["resid_post.-1"], cache[f"{blocks}.2"])
    assert torch.equal(cache["attn_out.0"], cache["blocks.0.hook_attn_out"])
    assert cache["attn_out.0"].shape == cache["mlp_out.0"].shape == (2, 5, SHAPE.d_model)


def test_tiny_sites_match_a_manual_forward():
    model = _tiny()
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        x = model.embed(ids) + model.pos_embed(torch.arange(7))
        b = model.blocks[1]
        x = model.blocks[0](x)
        attn = b.attn(b.ln1(x))
        hidden = b.mlp.act(b.mlp.fc_in(b.ln2(x + attn)))
        with capture(model, ["resid_pre.1", "attn_out.1", "mlp_post.1", "blocks.1.mlp.act"]) as c:
            model(ids)
    assert torch.equal(c["resid_pre.1"], x)
    assert torch.equal(c["attn_out.1"], attn)
    assert torch.equal(c["mlp_post.1"], hidden) and hidden.shape[-1] == 40
    assert torch.equal(c["blocks.1.mlp.act"], hidden)


def test_unknown_site_lists_valid_names():
    model = _tiny()
    with pytest.raises(ValueError, match=r"unknown site 'resid_centre\.0'") as err:
        resolve_site(model, "resid_centre.0")
    for name in ("resid_post.0", "mlp_post.2", "blocks.1.hook_resid_pre", "blocks.0.attn"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="out of range"):
        resolve_site(model, "resid_post.3")
    assert "ln_final" in valid_site_names(model)
    assert _n_hooks(model) == 0


def test_hooks_removed_after_exit_and_after_exception():
    model = _tiny()
    ids = torch.randint(0, 256, (1, 4))
    with capture(model, ["resid_post.0", "mlp_post.1"]) as cache:
        assert _n_hooks(model) == 2
        model(ids)
    assert _n_hooks(model) == 0 and set(cache) == {"resid_post.0", "mlp_post.1"}
    with pytest.raises(RuntimeError, match="boom"), capture(model, ["resid_pre.2"]):
        assert _n_hooks(model) == 1
        raise RuntimeError("boom")
    assert _n_hooks(model) == 0
    # a bad site in the list installs nothing
    with pytest.raises(ValueError, match="unknown site"), capture(model, ["resid_post.0", "nope"]):
        pass
    assert _n_hooks(model) == 0


def test_stream_matches_full_forward_and_stops_early():
    model = _tiny()
    tokens = torch.randint(0, 256, (16 * 5,)).numpy()
    seqs = TokenSequences(tokens, seq_len=16, batch_size=2)
    ran_last_block = []
    model.blocks[2].register_forward_hook(lambda *a: ran_last_block.append(1))
    src = ActivationSource(model, seqs, ["mlp_post.1", "resid_post.0"], progress=False)
    batches = list(src)
    assert not ran_last_block, "the forward should stop after block 1"
    assert [b["mlp_post.1"].shape for b in batches] == [(32, 40), (32, 40), (16, 40)]
    model.blocks[2]._forward_hooks.clear()
    ids = torch.as_tensor(tokens, dtype=torch.int64).view(5, 16)
    with torch.no_grad(), capture(model, ["mlp_post.1", "resid_post.0"]) as cache:
        model(ids)
    for site, width in (("mlp_post.1", 40), ("resid_post.0", 16)):
        streamed = torch.cat([b[site] for b in batches])
        assert torch.equal(streamed, cache[site].reshape(-1, width))
    assert src.tokens_seen == 80 and _n_hooks(model) == 0


def test_stream_max_tokens_and_skipped_positions():
    model = _tiny()
    tokens = torch.arange(16 * 6).remainder(256).numpy()
    tokens[::16] = 0  # every sequence starts with a "BOS" 0
    seqs = TokenSequences(tokens, seq_len=16, batch_size=2, skip_ids=[0])
    got = list(ActivationSource(model, seqs, "resid_post.0", progress=False))
    assert sum(b["resid_post.0"].shape[0] for b in got) == 6 * 15
    src = ActivationSource(model, seqs, ["resid_post.0"], max_tokens=40, progress=False)
    assert sum(b["resid_post.0"].shape[0] for b in src) == 40 == src.tokens_seen
    # abandoning the stream mid-way removes the hooks
    it = iter(ActivationSource(model, seqs, ["resid_post.0"], progress=False))
    next(it)
    assert _n_hooks(model) == 1
    it.close()
    assert _n_hooks(model) == 0


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live CPU tensor storages created by ATen ops inside the mode.

    Each op output's storage is counted once while any tensor created on it is alive
    (refcount per storage; weakref finalisers release it)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.current -= self.size.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.refs:
                    self.refs[key], self.size[key] = 0, storage.nbytes()
                    self.current += self.size[key]
                    self.peak = max(self.peak, self.current)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


def test_peak_memory_does_not_grow_with_tokens():
    """Streaming 10x more tokens keeps the peak within 10%: peak live tensor bytes (ATen
    allocations, tracked per storage) + peak Python/numpy heap (tracemalloc)."""
    model = _tiny(n_layers=2, d_model=64, d_ff=512, n_ctx=64)
    tokens = torch.randint(0, 256, (64 * 8 * 20,)).numpy()

    def peak(n_batches: int, keep: bool = False) -> int:
        seqs = TokenSequences(tokens, seq_len=64, batch_size=8, max_sequences=8 * n_batches)
        src = ActivationSource(model, seqs, ["resid_post.0", "mlp_post.1"], progress=False)
        total = torch.zeros(512, dtype=torch.float64)  # what an accumulator would keep
        kept = []
        tracemalloc.start()
        with _LiveTensorBytes() as live:
            for batch in src:
                total += batch["mlp_post.1"].sum(0, dtype=torch.float64)
                if keep:
                    kept.append(batch["mlp_post.1"])
            del batch, kept
        heap = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert src.tokens_seen == n_batches * 8 * 64
        return live.peak + heap

    peak(1)  # warm-up: first-call imports and caches
    small, large = peak(2), peak(20)
    assert small > 512 * 512 * 4  # at least one batch of mlp_post activations was live
    assert large <= 1.1 * small, (small, large)
    # control: the meter does see a consumer that keeps every batch
    assert peak(10, keep=True) > 3 * small


def test_capture_keeps_the_model_dtype(tmp_path):
    _tiny().save(tmp_path)
    model = load(tmp_path, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad(), capture(model, ["resid_post.0", "mlp_post.0"]) as cache:
        model(ids)
    assert cache["resid_post.0"].dtype == cache["mlp_post.0"].dtype == torch.bfloat16
    batch = next(iter(ActivationSource(model, [ids], ["mlp_post.0"], progress=False)))
    assert batch["mlp_post.0"].dtype == torch.bfloat16
    assert torch.equal(batch["mlp_post.0"], cache["mlp_post.0"].reshape(-1, 40))


def test_mlp_post_is_after_the_nonlinearity(hf_model):
    """mlp_post is the input of the MLP's output projection: act(fc(x)) for GPT-2/NeoX,
    act(gate(x)) * up(x) for Llama's gated MLP."""
    spec = arch_of(hf_model)
    mlp = f"{spec.blocks}.1.{spec.mlp}"
    gated = spec.name == "llama"
    extra = [f"{mlp}.act_fn", f"{mlp}.up_proj"] if gated else [f"{mlp}.act"]
    ids = torch.randint(0, SHAPE.vocab_size, (2, 6))
    with torch.no_grad(), capture(hf_model, ["mlp_post.1", *extra]) as cache:
        hf_model(ids)
    expected = cache[extra[0]] * cache[extra[1]] if gated else cache[extra[0]]
    assert torch.equal(cache["mlp_post.1"], expected)
