"""SAELens folders give SAELens' own codes, or a refusal naming the setting."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from interop_reference import max_diff, tiny_hf, tl_model
from safetensors.torch import load_file, save_file

from supanalysis.capture import capture
from supanalysis.dictionary import check_dictionary_site, load_saelens

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
D_IN, D_SAE = 16, 48
TOL = 1e-5  # float32 rounding


def _randomise(sae, seed: int = 0, threshold_shift: float = 0.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(
                torch.randn(p.shape, generator=g) * (0.5 if name != "threshold" else 0.3)
                + threshold_shift * (name == "threshold")
            )


def _saved(sae, tmp_path):
    sae.save_model(tmp_path)
    return SAE.load_from_disk(tmp_path), load_saelens(tmp_path)


def _x(n: int = 300, width: int = D_IN) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(3))


def test_topk_rescale_acts_by_decoder_norm(tmp_path):
    sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, rescale_acts_by_decoder_norm=True))
    _randomise(sae)  # decoder rows far from unit norm
    ref, ours = _saved(sae, tmp_path)
    x = _x()
    with torch.no_grad():
        codes = ref.encode(x)
        assert max_diff(ours.encode(x), codes) < TOL
        assert max_diff(ours.decode(ours.encode(x)), ref.decode(codes)) < TOL


def test_jumprelu_negative_thresholds(tmp_path):
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    _randomise(sae, threshold_shift=-0.5)
    assert (sae.threshold < 0).any()
    ref, ours = _saved(sae, tmp_path)
    with torch.no_grad():
        assert max_diff(ours.encode(_x()), ref.encode(_x())) < TOL
        assert (ours.encode(_x()) >= 0).all()


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bfloat16_folder_encodes_any_float_input(tmp_path, input_dtype):
    sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="bfloat16"))
    _randomise(sae)
    ref, ours = _saved(sae, tmp_path)
    assert ours.dtype == torch.bfloat16
    x = _x().to(input_dtype)
    with torch.no_grad():
        assert torch.equal(ours.encode(x), ref.encode(x))


def _rewrite_weights(folder, change) -> None:
    path = folder / "sae_weights.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("case", ["float8", "mixed"])
def test_float8_and_mixed_dtype_weights_cast_like_saelens(tmp_path, case):
    sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    _randomise(sae)
    sae.save_model(tmp_path)
    to = {"float8": torch.float8_e4m3fn, "mixed": torch.float16}[case]
    _rewrite_weights(tmp_path, lambda t: t.update(W_enc=t["W_enc"].to(to)))
    ref, ours = SAE.load_from_disk(tmp_path), load_saelens(tmp_path)
    with torch.no_grad():
        assert torch.equal(ours.encode(_x()), ref.encode(_x()))


def test_w_skip_and_float8_config_refused(tmp_path):
    sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    sae.save_model(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.update(W_skip=torch.zeros(D_IN, D_IN)))
    with pytest.raises(ValueError, match="W_skip"):
        load_saelens(tmp_path)
    sae.save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "dtype": "float8_e4m3fn"}))
    with pytest.raises(ValueError, match="dtype='float8_e4m3fn'"):
        load_saelens(tmp_path)


def _site_sae(tmp_path, hook_name: str, kwargs: dict | None = None, d_in: int = D_IN):
    meta = SAEMetadata(hook_name=hook_name, model_from_pretrained_kwargs=kwargs or {})
    with warnings.catch_warnings():  # SAELens advises how to load the model: not under test
        warnings.simplefilter("ignore")
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=D_SAE, k=6, metadata=meta))
        _randomise(sae, seed=5)
        sae.save_model(tmp_path)
        ref = SAE.load_from_disk(tmp_path)
    return ref, load_saelens(tmp_path)


def test_hook_name_checked_against_the_site(tmp_path):
    hf, _ = tiny_hf("gpt2", tmp_path / "model")
    _, ours = _site_sae(tmp_path / "sae", "blocks.0.hook_mlp_out")
    check_dictionary_site(ours, "mlp_out.0", hf)
    check_dictionary_site(ours, "blocks.0.hook_mlp_out", hf)
    with pytest.raises(ValueError, match=r"hook_name='blocks.0.hook_mlp_out'.*resid_post.0"):
        check_dictionary_site(ours, "resid_post.0", hf)
    with pytest.warns(UserWarning, match="trained at"):
        check_dictionary_site(ours, "resid_post.0", hf, force=True)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.mlp.hook_post"])
def test_transformer_lens_processed_sae_on_raw_activations(tmp_path, family, hook):
    """An SAE trained on fold_ln + center_writing_weights + center_unembed activations: our
    codes from the raw model equal SAELens' codes of TransformerLens' processed model."""
    processing = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True}
    hf, folder = tiny_hf(family, tmp_path / "model")
    tl = tl_model(hf, folder, **processing)
    ref, ours = _site_sae(tmp_path / "sae", hook, processing, d_in=40 if "hook_post" in hook else D_IN)
    assert ours.capture_convention.center == ("resid" in hook or "out" in hook)
    assert "center_writing_weights=True" in ours.capture_convention.describe()
    check_dictionary_site(ours, hook, hf)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), capture(hf, [hook]) as cache:
        hf(ids)
        _, tl_cache = tl.run_with_cache(ids)
        diff = max_diff(ours.encode(cache[hook]), ref.encode(tl_cache[hook]))
    print(f"{family} {hook}: max |code diff| {diff:.2e}")
    assert diff < TOL


def test_processing_that_cannot_be_reproduced_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fold_value_biases"):
        _site_sae(tmp_path / "z", "blocks.0.attn.hook_z", {"fold_value_biases": True})
    hf, _ = tiny_hf("llama", tmp_path / "model")
    _, ours = _site_sae(tmp_path / "resid", "blocks.0.hook_resid_post", {"center_writing_weights": True})
    with pytest.raises(ValueError, match="not LayerNorm"):
        check_dictionary_site(ours, "resid_post.0", hf)
