"""Train a TopK sparse autoencoder on streamed activations (Gao et al. 2024).

Recipe (:mod:`.train_recipe`): decoder rows random unit vectors kept at unit norm (gradient
component along each row removed before the step, rows renormalised after it), encoder
initialised to the decoder's transpose, ``b_dec`` at the geometric median of the first batch,
Adam with lr ∝ 1/sqrt(n_latents) warmed up and decayed, loss = FVU of the reconstruction +
``aux_coef`` × FVU of the AuxK reconstruction of the residual from the ``aux_k`` strongest
*dead* latents (dead: silent for ``dead_after_tokens`` tokens), and latents still dead after
``resample_after_tokens`` re-pointed at badly reconstructed tokens. The step itself is one
autograd function with a sparse backward (:mod:`.topk_kernels`) and no host sync; metrics
are read back every ``log_every`` steps. Checkpoints (:mod:`.train_checkpoint`) are atomic as
a whole, checksummed, and resume bit-exactly where the run stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .base import Dictionary
from .topk_kernels import topk_sae_loss
from .train_checkpoint import (
    STATE_JSON,
    STATE_TENSORS,
    adam_tensors,
    load_checkpoint,
    publish_current,
    restore_adam,
    save_checkpoint,
)
from .train_recipe import (
    init_dictionary,
    lr_factor,
    project_decoder_grad,
    renormalise_decoder,
    resample_dead,
)

__all__ = ["STATE_JSON", "STATE_TENSORS", "TopKTrainConfig", "TrainResult", "train_topk_sae"]


@dataclass
class TopKTrainConfig:
    """Hyperparameters of :func:`train_topk_sae` (defaults follow Gao et al. 2024).

    Attributes:
        lr: Adam learning rate; ``None`` = 2e-4 / sqrt(d_sae / 2**14).
        batch_size: activations per optimiser step (incoming batches are re-cut to it).
        aux_k: dead latents used by the AuxK loss; ``None`` = d_in // 2 (at most d_sae).
        aux_coef: weight of the AuxK loss (1/32 in the paper; 0 turns it off).
        dead_after_tokens: a latent silent for this many tokens counts as dead;
            ``None`` = max(n_tokens // 10, batch_size).
        resample_after_tokens: a latent silent this long is re-initialised on the residual of
            a badly reconstructed token; ``None`` = 2 × dead_after_tokens, 0 = never. Checked
            every dead_after_tokens, and not once the learning rate decays.
        resample_scale: a resampled latent's encoder norm relative to the live latents' mean
            (0.2, Anthropic 2023; at 1.0 it overshoots and a short run's FVU can exceed 1).
        b_dec_init: ``"median"`` (geometric median of the first batch) or ``"mean"``.
        median_steps: Weiszfeld iterations of the geometric median.
        warmup_tokens: linear learning-rate warm-up; ``None`` = 5% of n_tokens.
        lr_decay: ``"linear"`` or ``"cosine"`` decay to 0 at n_tokens, or ``"none"``.
        decay_start: fraction of n_tokens where the decay begins (Gao: the last 20%).
        log_every: steps between entries of the history (and progress-bar updates); the
            only host syncs of the loop are there, at checkpoints and at resampling checks.
        checkpoint_every: tokens between checkpoints (when a checkpoint folder is given).
        seed: seed of the decoder initialisation and of resampling.
        device: where the dictionary trains (default: where the activations arrive).
    """

    lr: float | None = None
    batch_size: int = 4096
    aux_k: int | None = None
    aux_coef: float = 1 / 32
    dead_after_tokens: int | None = None
    resample_after_tokens: int | None = None
    resample_scale: float = 0.2
    b_dec_init: str = "median"
    median_steps: int = 10
    warmup_tokens: int | None = None
    lr_decay: str = "linear"
    decay_start: float = 0.8
    log_every: int = 50
    checkpoint_every: int = 1_000_000
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.b_dec_init not in ("median", "mean"):
            raise ValueError(f"b_dec_init must be 'median' or 'mean', got {self.b_dec_init!r}")
        if self.lr_decay not in ("none", "linear", "cosine"):
            raise ValueError(f"lr_decay must be 'none', 'linear' or 'cosine', got {self.lr_decay!r}")
        if not 0 <= self.decay_start <= 1:
            raise ValueError(f"decay_start must be in [0, 1], got {self.decay_start!r}")
        if self.batch_size < 1 or self.log_every < 1:
            raise ValueError("batch_size and log_every must be positive")


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
        history: one dict per logging window (step, tokens, fvu, l0, dead_fraction, aux_loss,
            resampled: latents re-initialised so far).
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


def _stream(source: Iterable, site: str | None, batch_size: int, skip: int) -> Iterator[Tensor]:
    """Batches of the source, cycled forever, after skipping ``skip`` activations."""
    while True:
        seen, got = [0], False
        for x in _rebatch(source, site, batch_size, skip, seen):
            got = True
            yield x
        if not seen[0]:
            raise ValueError("source yielded no activations")
        # A resumed run that had cycled through the source skips whole passes.
        skip = max(skip - seen[0], 0) % seen[0] if not got else 0


@dataclass
class _Plan:
    """The config's defaults resolved for one run (token counts, lr, aux_k)."""

    n_tokens: int
    d_sae: int
    k: int
    dead_after: int
    resample_after: int
    warmup: int
    lr: float


def _plan(cfg: TopKTrainConfig, d_sae: int, k: int, n_tokens: int) -> _Plan:
    dead_after = cfg.dead_after_tokens or max(n_tokens // 10, cfg.batch_size)
    resample = 2 * dead_after if cfg.resample_after_tokens is None else cfg.resample_after_tokens
    warmup = int(0.05 * n_tokens) if cfg.warmup_tokens is None else cfg.warmup_tokens
    lr = cfg.lr or 2e-4 / math.sqrt(d_sae / 2**14)
    return _Plan(n_tokens, d_sae, k, dead_after, resample, warmup, lr)


class _Run:
    """One training run's mutable state: SAE, optimiser, firing counters, metric window."""

    def __init__(self, cfg: TopKTrainConfig, plan: _Plan, site: str | None) -> None:
        self.cfg, self.plan, self.site = cfg, plan, site
        self.state: dict[str, Any] = {"tokens": 0, "steps": 0, "resampled": 0, "history": [], "window": [0.0] * 4}
        self.sae: Dictionary | None = None
        self.saved: dict[str, Tensor] = {}
        self.opt: torch.optim.Adam | None = None

    def resume(self, folder: Path) -> None:
        self.sae, self.state, self.saved = load_checkpoint(folder, torch.device(self.cfg.device or "cpu"))

    def _start(self, x: Tensor) -> None:
        cfg, plan = self.cfg, self.plan
        if self.sae is None:
            self.sae = init_dictionary(x, plan.d_sae, plan.k, cfg.seed, self.site, cfg.b_dec_init, cfg.median_steps)
        self.sae.to(x.device)
        self.params = list(self.sae.parameters())
        self.opt = torch.optim.Adam(self.params, lr=plan.lr, eps=6.25e-10)
        if self.saved:
            restore_adam(self.opt, self.params, self.saved, self.state["steps"])
        zero = torch.zeros(plan.d_sae, dtype=torch.int64, device=x.device)
        self.since_fired = self.saved.get("since_fired", zero).to(x.device)
        acc_dtype = torch.float32 if x.device.type == "mps" else torch.float64
        self.window = torch.tensor(self.state["window"], dtype=acc_dtype, device=x.device)
        self.aux_k = min(cfg.aux_k or x.shape[1] // 2, plan.d_sae)

    def step(self, x: Tensor) -> None:
        """One optimiser step on x (B, m); no host sync."""
        if self.opt is None:
            self._start(x)
        sae, plan, state = self.sae, self.plan, self.state
        for group in self.opt.param_groups:
            group["lr"] = plan.lr * lr_factor(state["tokens"], plan.n_tokens, plan.warmup, self.cfg.lr_decay,
                                              self.cfg.decay_start)  # fmt: skip
        # Nothing can have been silent for dead_after tokens before that many were seen.
        aux = self.cfg.aux_coef > 0 and state["tokens"] >= plan.dead_after
        dead = self.since_fired >= plan.dead_after if aux else None
        loss, main, aux_fvu, idx, act = topk_sae_loss(x, sae.W_enc, sae.b_enc, sae._W_dec, sae.b_dec, plan.k, dead,
                                                      self.aux_k, self.cfg.aux_coef)  # fmt: skip
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        project_decoder_grad(sae)
        self.opt.step()
        renormalise_decoder(sae)
        on = (act > 0).reshape(-1)
        fired = torch.zeros(plan.d_sae, dtype=torch.float32, device=x.device)
        fired.index_add_(0, idx.reshape(-1), on.to(torch.float32))
        self.since_fired.add_(x.shape[0]).masked_fill_(fired > 0, 0)
        l0 = on.sum().to(self.window.dtype) / x.shape[0]
        self.window += torch.stack([main.to(l0.dtype), l0, aux_fvu.to(l0.dtype), torch.ones_like(l0)])
        state["tokens"] += x.shape[0]
        state["steps"] += 1
        self._maybe_resample(x)

    def _maybe_resample(self, x: Tensor) -> None:
        plan, state = self.plan, self.state
        every = max(1, plan.dead_after // self.cfg.batch_size)
        if not plan.resample_after or state["steps"] % every or state["tokens"] < plan.resample_after:
            return
        if state["tokens"] >= self.cfg.decay_start * plan.n_tokens:
            return  # a latent resampled now would have no time left to learn
        dead = self.since_fired >= plan.resample_after
        n = resample_dead(self.sae, self.opt, x.float(), dead, self.cfg.seed, state["steps"], self.cfg.resample_scale)
        self.since_fired.masked_fill_(dead, 0)
        state["resampled"] += n

    def log(self) -> dict[str, float]:
        fvu_sum, l0_sum, aux_sum, n = self.window.tolist()
        n = max(n, 1.0)
        entry = {
            "step": self.state["steps"],
            "tokens": self.state["tokens"],
            "fvu": fvu_sum / n,
            "l0": l0_sum / n,
            "aux_loss": aux_sum / n,
            "dead_fraction": (self.since_fired >= self.plan.dead_after).float().mean().item(),
            "resampled": self.state["resampled"],
        }
        self.state["history"].append(entry)
        self.window.zero_()
        return entry

    def checkpoint(self, folder: Path) -> None:
        tensors = {"since_fired": self.since_fired, **adam_tensors(self.opt, self.params)}
        self.state["window"] = self.window.tolist()
        save_checkpoint(folder, self.sae, tensors, self.state)


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
            ``tokens`` activations are skipped so none is seen twice). A checkpoint whose
            files fail their checksums is refused with the file named.
        progress: tqdm bar over tokens with FVU / L0 / dead fraction.
    """
    cfg = config or TopKTrainConfig()
    if d_sae < 1 or k < 1 or k > d_sae:
        raise ValueError(f"need 1 <= k <= d_sae, got k={k}, d_sae={d_sae}")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    run = _Run(cfg, _plan(cfg, d_sae, k, n_tokens), site)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None and (folder / STATE_JSON).exists():
        run.resume(folder)
    state = run.state
    bar = tqdm(total=n_tokens, initial=min(state["tokens"], n_tokens), unit="tok", unit_scale=True,
               disable=not progress)  # fmt: skip
    last_ckpt = state["tokens"]
    finished_before = state["tokens"] >= n_tokens
    try:
        batches = _stream(source, site, cfg.batch_size, state["tokens"]) if state["tokens"] < n_tokens else iter(())
        for x in batches:
            x = x[: n_tokens - state["tokens"]]
            x = x.to(torch.device(cfg.device) if cfg.device else x.device, torch.float32)
            run.step(x)
            bar.update(x.shape[0])
            done = state["tokens"] >= n_tokens
            if state["steps"] % cfg.log_every == 0 or done:
                entry = run.log()
                bar.set_postfix(fvu=f"{entry['fvu']:.4f}", l0=f"{entry['l0']:.1f}",
                                dead=f"{entry['dead_fraction']:.3f}")  # fmt: skip
            if folder is not None and (done or state["tokens"] - last_ckpt >= cfg.checkpoint_every):
                run.checkpoint(folder)
                last_ckpt = state["tokens"]
            if done:
                break
        if folder is not None and finished_before:
            # Resumed after the end: finish publishing the last checkpoint (a no-op when a
            # kill did not interrupt that).
            publish_current(folder)
    finally:
        bar.close()
    last = state["history"][-1]
    return TrainResult(run.sae, state["tokens"], state["steps"], last["fvu"], last["l0"],
                       last["dead_fraction"], state["history"])  # fmt: skip
