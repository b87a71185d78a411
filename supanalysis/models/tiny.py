"""A small decoder-only transformer the demo and the tests train.

Pre-LN blocks, learned absolute positions, GELU MLP, causal self-attention. The module
names are chosen so that sites read naturally: ``blocks.3``, ``blocks.3.mlp.act``, ...
Saved as ``config.json`` + ``model.safetensors`` (never pickled).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

#: ``model_type`` written to config.json; :func:`supanalysis.models.load` dispatches on it.
TINY_MODEL_TYPE = "supanalysis-tiny"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class TinyConfig:
    """Shape of a :class:`TinyTransformer`.

    Attributes:
        n_layers: number of transformer blocks L.
        d_model: residual stream width d.
        n_heads: attention heads; must divide ``d_model``.
        d_ff: MLP hidden width (the ``mlp_post`` site has this many neurons).
        vocab_size: token vocabulary (256 for bytes-as-tokens).
        n_ctx: maximum sequence length (rows of the learned position embedding).
        tie_embeddings: share the unembedding with the token embedding.
        init_std: standard deviation of the normal weight initialisation.
    """

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 256
    vocab_size: int = 256
    n_ctx: int = 128
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "d_ff", "vocab_size", "n_ctx"):
            value = getattr(self, name)
            # bool is an int subclass: n_layers=true in a config.json must not pass as 1.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TinyConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"TinyConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        std = self.init_std
        if isinstance(std, bool) or not isinstance(std, numbers.Real) or not 0 <= std < math.inf:
            raise ValueError(f"TinyConfig.init_std must be a finite number >= 0, got {std!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"TinyConfig.n_heads={self.n_heads} must divide d_model={self.d_model}")

    @classmethod
    def from_dict(cls, data: dict) -> TinyConfig:
        """Build from a config.json dict, ignoring keys that are not fields (model_type)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class Attention(nn.Module):
    """Causal multi-head self-attention. x: (batch, seq, d_model) -> (batch, seq, d_model)."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        # (batch, seq, d) -> (batch, heads, seq, head_dim)
        q, k, v = (t.view(b, s, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class MLP(nn.Module):
    """fc_in -> GELU -> fc_out. The ``act`` output (width d_ff) is the ``mlp_post`` site."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then + mlp(ln2(.))."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Decoder-only language model.

    ``forward(ids)``: ids (batch, seq) int64 -> logits (batch, seq, vocab_size).
    """

    def __init__(self, cfg: TinyConfig | None = None, **kwargs: int) -> None:
        super().__init__()
        if cfg is None:
            cfg = TinyConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either cfg or keyword fields, not both")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
                nn.init.ones_(p)
            elif p.dim() == 1:
                nn.init.zeros_(p)
            elif name.endswith(("attn.out.weight", "mlp.fc_out.weight")):
                # Residual-writing projections shrink with depth so the stream's variance
                # stays O(1) at initialisation (GPT-2's scheme).
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, seq), got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.config.n_ctx:
            raise ValueError(f"ids has {ids.shape[1]} positions, n_ctx is {self.config.n_ctx}")
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed(ids) + self.pos_embed(pos)
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_f(x))

    def loss(self, ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats) of ids (batch, seq)."""
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))

    def save(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``folder`` (created)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"model_type": TINY_MODEL_TYPE, **asdict(self.config)}
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        # save_model drops the duplicate name of tied weights; safetensors refuses aliases.
        save_model(self, str(folder / WEIGHTS_FILE))
        return folder

    @classmethod
    def load(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> TinyTransformer:
        """Read a folder written by :meth:`save`; the model comes back in eval mode."""
        folder = Path(folder)
        cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for path in (cfg_path, weights):
            if not path.is_file():
                raise FileNotFoundError(f"not a TinyTransformer folder: {path} is missing")
        data = read_config(cfg_path)
        if data.get("model_type") != TINY_MODEL_TYPE:
            raise ValueError(f"{cfg_path} has model_type={data.get('model_type')!r}, expected {TINY_MODEL_TYPE!r}")
        try:
            cfg = TinyConfig.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{cfg_path}: {exc}") from exc
        _check_weights_match(cfg, weights)
        model = cls(cfg)
        try:
            load_model(model, str(weights), strict=True, device=str(map_location))
        except (RuntimeError, SafetensorError) as exc:  # e.g. a tied alias stored twice
            raise ValueError(f"{weights} does not match {cfg_path}: {exc}") from exc
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{weights}: tensor {name!r} holds NaN or infinite values")
        return model.eval()


def read_config(path: Path) -> dict:
    """A config.json as a dict; the error names the file (json's own message does not)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def expected_shapes(cfg: TinyConfig) -> dict[str, tuple[int, ...]]:
    """Every state_dict name of a :class:`TinyTransformer` with ``cfg`` and its shape, computed
    without building anything (plain ints, so a corrupt config cannot allocate or overflow)."""
    d, f, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {"embed.weight": (V, d), "pos_embed.weight": (cfg.n_ctx, d)}
    per_block = {
        "ln1.weight": (d,), "ln1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
        "attn.out.weight": (d, d), "attn.out.bias": (d,), "ln2.weight": (d,), "ln2.bias": (d,),
        "mlp.fc_in.weight": (f, d), "mlp.fc_in.bias": (f,), "mlp.fc_out.weight": (d, f), "mlp.fc_out.bias": (d,),
    }  # fmt: skip
    for i in range(cfg.n_layers):
        out.update({f"blocks.{i}.{k}": v for k, v in per_block.items()})
    out.update({"ln_f.weight": (d,), "ln_f.bias": (d,), "unembed.weight": (V, d)})
    return out


def _check_weights_match(cfg: TinyConfig, weights: Path) -> None:
    """Compare the tensor names and shapes in ``weights``' header with those ``cfg`` implies,
    before allocating the model: a corrupt config (n_layers=10**6, d_model=2**40) must fail
    cleanly, not allocate (or OOM on) a model the file cannot fill."""
    try:
        with safe_open(str(weights), framework="pt") as fh:
            stored = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except SafetensorError as exc:
        raise ValueError(f"{weights} is not a readable safetensors file: {exc}") from exc
    n_blocks = len({k.split(".")[1] for k in stored if k.startswith("blocks.")})
    if cfg.n_layers != n_blocks:  # checked first, so the listing below stays as small as the file
        raise ValueError(f"{weights} holds {n_blocks} blocks, config.json says n_layers={cfg.n_layers}")
    expected = expected_shapes(cfg)
    tied = {"embed.weight", "unembed.weight"}
    missing = set(expected) - set(stored)
    if cfg.tie_embeddings and tied & set(stored):
        missing -= tied  # save_model stores one name of the tied pair
    wrong = [f"{k}: {stored[k]} in the file, {expected[k]} from config.json" for k in stored
             if k in expected and stored[k] != expected[k]]  # fmt: skip
    unexpected = set(stored) - set(expected)
    if missing or wrong or unexpected:
        raise ValueError(
            f"{weights} does not match its config.json: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}, shape mismatches {wrong[:5]}"
        )
