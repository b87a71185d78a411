"""Train a TopK sparse autoencoder on streamed activations (Gao et al. 2024).

Recipe: decoder rows kept at unit norm (gradient component along each row removed before
the step, rows renormalised after it), encoder initialised to the decoder's transpose,
``b_dec`` to the first batch's mean, Adam with lr ∝ 1/sqrt(n_latents), loss = FVU of the
reconstruction + ``aux_coef`` × FVU of the AuxK reconstruction of the residual from the
``aux_k`` strongest *dead* latents (dead: silent for ``dead_after_tokens`` tokens).
Checkpoints (a SAELens folder + trainer state, all safetensors/JSON) resume exactly where
the run stopped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .activations import TopK
from .base import Dictionary
from .formats import load_saelens, save_saelens
from .metrics import fvu

STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"


@dataclass
class TopKTrainConfig:
    """Hyperparameters of :func:`train_topk_sae` (defaults follow Gao et al. 2024).

    Attributes:
        lr: Adam learning rate; ``None`` = 2e-4 / sqrt(d_sae / 2**14).
        batch_size: activations per optimiser step (incoming batches are re-cut to it).
        aux_k: dead latents used by the AuxK loss; ``None`` = d_in // 2.
        aux_coef: weight of the AuxK loss (1/32 in the paper).
        dead_after_tokens: a latent silent for this many tokens counts as dead;
            ``None`` = max(n_tokens // 10, batch_size).
        log_every: steps between entries of the history (and progress-bar updates).
        checkpoint_every: tokens between checkpoints (when a checkpoint folder is given).
        seed: seed of the decoder initialisation.
        device: where the dictionary trains (default: where the activations arrive).
    """

    lr: float | None = None
    batch_size: int = 4096
    aux_k: int | None = None
    aux_coef: float = 1 / 32
    dead_after_tokens: int | None = None
    log_every: int = 50
    checkpoint_every: int = 1_000_000
    seed: int = 0
    device: str | None = None


@dataclass
class TrainResult:
    """Outcome of :func:`train_topk_sae`.

    Attributes:
        dictionary: the trained TopK :class:`Dictionary` (``metadata["hook_name"]`` = site).
        tokens: activations consumed.
        steps: optimiser steps.
        fvu: fraction of variance unexplained over the last logging window.
        l0: mean active latents per token over the last window.
        dead_fraction: latents silent for ``dead_after_tokens`` at the end.
        history: one dict per logging window (step, tokens, fvu, l0, dead_fraction, aux_loss).
    """

    dictionary: Dictionary
    tokens: int
    steps: int
    fvu: float
    l0: float
    dead_fraction: float
    history: list[dict[str, float]] = field(default_factory=list)


def _rebatch(source: Iterable, site: str | None, batch_size: int, skip: int, seen: list[int]) -> Iterator[Tensor]:
    """Cut one pass of the stream into (batch_size, m) batches, after skipping ``skip``
    activations; ``seen[0]`` counts the pass's activations, skipped ones included."""
    buf: list[Tensor] = []
    have = 0
    for item in source:
        x = item[site] if site is not None else item
        seen[0] += x.shape[0]
        if skip:
            drop = min(skip, x.shape[0])
            x, skip = x[drop:], skip - drop
        if not x.shape[0]:
            continue
        buf.append(x)
        have += x.shape[0]
        while have >= batch_size:
            flat = torch.cat(buf) if len(buf) > 1 else buf[0]
            yield flat[:batch_size]
            rest = flat[batch_size:]
            buf, have = ([rest] if rest.shape[0] else []), rest.shape[0]
    if have:
        yield torch.cat(buf)


def _init_dictionary(x: Tensor, d_sae: int, k: int, seed: int, site: str | None) -> Dictionary:
    d_in = x.shape[1]
    sae = Dictionary(d_in, d_sae, TopK(k), device=x.device, metadata={"hook_name": site})
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_sae, d_in, generator=gen, dtype=torch.float32).to(x.device)
    w /= w.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        # Centring on the data mean lets the latents spend themselves on variance.
        sae.b_dec.copy_(x.float().mean(0))
    return sae


def _save_checkpoint(folder: Path, sae: Dictionary, opt: torch.optim.Adam, state: dict,
                     since_fired: Tensor) -> None:  # fmt: skip
    save_saelens(sae, folder)
    tensors = {"since_fired": since_fired}
    for i, p in enumerate(sae.parameters()):
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, Tensor):
                tensors[f"adam.{i}.{key}"] = value
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              str(folder / STATE_TENSORS))  # fmt: skip
    (folder / STATE_JSON).write_text(json.dumps(state, indent=2) + "\n")


def _load_checkpoint(folder: Path, device: torch.device) -> tuple[Dictionary, dict, dict]:
    sae = load_saelens(folder).to(device)
    tensors = {k: v.to(device) for k, v in load_file(str(folder / STATE_TENSORS)).items()}
    return sae, json.loads((folder / STATE_JSON).read_text()), tensors


def train_topk_sae(
    source: Iterable,
    site: str | None,
    d_sae: int,
    k: int,
    n_tokens: int,
    *,
    config: TopKTrainConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a TopK SAE on ``n_tokens`` activations of ``site``.

    Args:
        source: re-iterable stream of ``{site: Tensor[T, m]}`` dicts (an
            :class:`~supanalysis.capture.ActivationSource`) or of (T, m) tensors
            (then ``site`` may be ``None``); it is iterated again when exhausted.
        site: key of the activations in each dict; stored as ``metadata["hook_name"]``.
        d_sae: number of latents n.
        k: active latents per token.
        n_tokens: activations to train on.
        config: hyperparameters (:class:`TopKTrainConfig`).
        checkpoint_dir: write a checkpoint there every ``checkpoint_every`` tokens and at
            the end; if it already holds one, training resumes from it (the stream's first
            ``tokens`` activations are skipped so none is seen twice).
        progress: tqdm bar over tokens with FVU / L0 / dead fraction.
    """
    cfg = config or TopKTrainConfig()
    if d_sae < 1 or k < 1 or k > d_sae:
        raise ValueError(f"need 1 <= k <= d_sae, got k={k}, d_sae={d_sae}")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    dead_after = cfg.dead_after_tokens or max(n_tokens // 10, cfg.batch_size)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resume = folder is not None and (folder / STATE_JSON).is_file()
    state = {"tokens": 0, "steps": 0, "history": []}
    saved: dict[str, Tensor] = {}
    sae: Dictionary | None = None
    if resume:
        device = torch.device(cfg.device or "cpu")
        sae, state, saved = _load_checkpoint(folder, device)

    def stream() -> Iterator[Tensor]:
        skip = state["tokens"]
        while True:
            seen, got = [0], False
            for x in _rebatch(source, site, cfg.batch_size, skip, seen):
                got = True
                yield x
            if not seen[0]:
                raise ValueError("source yielded no activations")
            # A resumed run that had cycled through the source skips whole passes.
            skip = max(skip - seen[0], 0) % seen[0] if not got else 0

    batches = stream()
    bar = tqdm(total=n_tokens, initial=state["tokens"], unit="tok", unit_scale=True,
               disable=not progress)  # fmt: skip
    opt = since_fired = None
    window = {"fvu": 0.0, "l0": 0.0, "aux": 0.0, "n": 0}
    last_ckpt = state["tokens"]
    try:
        while state["tokens"] < n_tokens:
            x = next(batches)[: n_tokens - state["tokens"]]
            device = torch.device(cfg.device) if cfg.device else x.device
            x = x.to(device, torch.float32)
            if sae is None:
                sae = _init_dictionary(x, d_sae, k, cfg.seed, site)
            if opt is None:
                lr = cfg.lr or 2e-4 / math.sqrt(d_sae / 2**14)
                opt = torch.optim.Adam(sae.parameters(), lr=lr, eps=6.25e-10)
                since_fired = saved.get("since_fired", torch.zeros(d_sae, dtype=torch.int64,
                                                                    device=device))  # fmt: skip
                if resume:
                    _restore_adam(opt, sae, saved, state["steps"])
            loss, stats = _step_loss(sae, x, since_fired >= dead_after, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _project_decoder_grad(sae)
            opt.step()
            with torch.no_grad():
                sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
            fired = torch.zeros(d_sae, dtype=torch.bool, device=device)
            fired[stats.pop("indices")[stats.pop("values") > 0]] = True
            since_fired += x.shape[0]
            since_fired[fired] = 0
            state["tokens"] += x.shape[0]
            state["steps"] += 1
            for key in ("fvu", "l0", "aux"):
                window[key] += stats[key]
            window["n"] += 1
            bar.update(x.shape[0])
            if state["steps"] % cfg.log_every == 0 or state["tokens"] >= n_tokens:
                entry = _log(window, state, since_fired, dead_after)
                bar.set_postfix(fvu=f"{entry['fvu']:.4f}", l0=f"{entry['l0']:.1f}",
                                dead=f"{entry['dead_fraction']:.3f}")  # fmt: skip
            if folder is not None and state["tokens"] - last_ckpt >= cfg.checkpoint_every:
                _save_checkpoint(folder, sae, opt, state, since_fired)
                last_ckpt = state["tokens"]
    finally:
        bar.close()
    if window["n"]:
        _log(window, state, since_fired, dead_after)
    if folder is not None and sae is not None and opt is not None:
        _save_checkpoint(folder, sae, opt, state, since_fired)
    last = state["history"][-1]
    return TrainResult(sae, state["tokens"], state["steps"], last["fvu"], last["l0"],
                       last["dead_fraction"], state["history"])  # fmt: skip


def _step_loss(sae: Dictionary, x: Tensor, dead: Tensor, cfg: TopKTrainConfig) -> tuple[Tensor, dict]:
    pre = sae.pre_activations(x)
    indices, values = sae.activation.sparse(pre)
    x_hat = sae.decode_sparse(indices, values)
    loss = fvu(x, x_hat)
    stats = {"indices": indices.detach(), "values": values.detach(), "fvu": loss.item(),
             "l0": (values > 0).sum(1).float().mean().item(), "aux": 0.0}  # fmt: skip
    n_dead = int(dead.sum())
    if n_dead:
        aux_k = min(cfg.aux_k or x.shape[1] // 2, n_dead)
        # Only dead latents compete; they learn to explain what the live ones miss.
        dead_pre = pre.masked_fill(~dead, float("-inf"))
        aux_vals, aux_idx = dead_pre.topk(aux_k, dim=-1, sorted=False)
        residual = (x - x_hat).detach()
        e_hat = sae.decode_sparse(aux_idx, torch.relu(aux_vals)) - sae.b_dec
        aux = fvu(residual, e_hat)
        if torch.isfinite(aux):
            loss = loss + cfg.aux_coef * aux
            stats["aux"] = aux.item()
    return loss, stats


def _project_decoder_grad(sae: Dictionary) -> None:
    # Remove the gradient component along each (unit) decoder row: the row's norm is fixed
    # by renormalisation, so that component would only fight Adam's moment estimates.
    w, g = sae.W_dec, sae.W_dec.grad
    if g is not None:
        g.sub_((g * w).sum(1, keepdim=True) * w)


def _restore_adam(opt: torch.optim.Adam, sae: Dictionary, saved: dict, steps: int) -> None:
    state = {}
    for i, _p in enumerate(sae.parameters()):
        if f"adam.{i}.exp_avg" in saved:
            state[i] = {
                "step": torch.tensor(float(steps)),
                "exp_avg": saved[f"adam.{i}.exp_avg"],
                "exp_avg_sq": saved[f"adam.{i}.exp_avg_sq"],
            }
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _log(window: dict, state: dict, since_fired: Tensor, dead_after: int) -> dict:
    n = max(window["n"], 1)
    entry = {
        "step": state["steps"],
        "tokens": state["tokens"],
        "fvu": window["fvu"] / n,
        "l0": window["l0"] / n,
        "aux_loss": window["aux"] / n,
        "dead_fraction": (since_fired >= dead_after).float().mean().item(),
    }
    state["history"].append(entry)
    window.update(fvu=0.0, l0=0.0, aux=0.0, n=0)
    return entry
