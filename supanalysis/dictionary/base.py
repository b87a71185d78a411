"""Feature bases: a sparse dictionary (SAE) and the trivial neuron basis.

Shapes: activations x (..., m); codes (..., n); decoder directions ``W_dec`` (n, m).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import ACTIVATIONS, Activation, JumpReLU, TopK
from .convention import RAW, CaptureConvention


class FeatureBasis(nn.Module):
    """What the analysis needs from a set of features: ``encode``, ``decode``, ``W_dec``."""

    d_in: int
    n_features: int

    @property
    def W_dec(self) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor, *, sparse: bool = False, k: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of x (..., m)."""
        return self.decode(self.encode(x))  # type: ignore[arg-type]


def _make_activation(activation: str | Activation, n: int, k: int | None) -> Activation:
    if isinstance(activation, Activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} unknown; registered: {sorted(ACTIVATIONS)}")
    if activation == "topk":
        if k is None:
            raise ValueError("activation='topk' needs k")
        return TopK(k)
    if activation == "jumprelu":
        return JumpReLU(torch.zeros(n))
    act = ACTIVATIONS[activation]()
    act.k = k
    return act


class Dictionary(FeatureBasis):
    """A sparse dictionary: codes = act((x - b_dec) @ W_enc + b_enc), x̂ = codes @ W_dec + b_dec.

    Args:
        d_in: input width m.
        n_features: number of latents n.
        activation: a registered name (``"relu"``, ``"topk"``, ``"jumprelu"``) or an
            :class:`Activation` instance.
        k: latents kept by TopK (and the default k of sparse encoding).
        apply_b_dec_to_input: subtract ``b_dec`` before encoding (SAELens' flag; sparsify
            always does).
        metadata: JSON-able facts (``hook_name``, ``model_name``...) carried by the formats.
        rescale_acts_by_decoder_norm: SAELens' TopK option: pre-activations are multiplied by
            each decoder row's norm before the activation, codes divided by it before decoding,
            so the codes are in units of unit-norm directions (``W_dec`` then returns them).
        fused_encoder_bias: add ``b_enc`` inside the matrix product (``F.linear``, one rounding,
            sparsify) instead of after it (``x @ W_enc + b_enc``, SAELens); equal in exact
            arithmetic, and in bfloat16 the difference changes which latents win a top-k.
        transcoder: the decoder predicts another site's activations (sparsify ``transcode``):
            ``decode`` is that prediction, not a reconstruction of the input.
        capture_convention: the activations the dictionary was trained on, relative to the raw
            model (see :class:`CaptureConvention`); ``encode`` applies it to its input.

    Parameters ``W_enc`` (m, n), ``b_enc`` (n,), ``W_dec`` (n, m), ``b_dec`` (m,) start at
    zero; the trainer or a loader fills them.
    """

    def __init__(
        self,
        d_in: int,
        n_features: int,
        activation: str | Activation = "relu",
        *,
        k: int | None = None,
        apply_b_dec_to_input: bool = True,
        metadata: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        rescale_acts_by_decoder_norm: bool = False,
        fused_encoder_bias: bool = False,
        transcoder: bool = False,
        capture_convention: CaptureConvention = RAW,
    ) -> None:
        super().__init__()
        if d_in < 1 or n_features < 1:
            raise ValueError(f"d_in and n_features must be positive, got {d_in}, {n_features}")
        self.d_in, self.n_features = d_in, n_features
        kw = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.zeros(d_in, n_features, **kw))
        self.b_enc = nn.Parameter(torch.zeros(n_features, **kw))
        self._W_dec = nn.Parameter(torch.zeros(n_features, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        self.activation = _make_activation(activation, n_features, k).to(**kw)
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.rescale_acts_by_decoder_norm = rescale_acts_by_decoder_norm
        self.fused_encoder_bias, self.transcoder = fused_encoder_bias, transcoder
        self.capture_convention = capture_convention
        self.metadata = dict(metadata or {})
        #: log10 of each latent's firing density (SAELens' sparsity.safetensors), if known
        self.log10_density: Tensor | None = None

    @property
    def W_dec(self) -> Tensor:
        """Decoder directions, (n_features, d_in): what one unit of each code adds to the
        reconstruction (unit rows under ``rescale_acts_by_decoder_norm``)."""
        if self.rescale_acts_by_decoder_norm:
            return self._W_dec * (1 / self._W_dec.norm(dim=-1, keepdim=True))
        return self._W_dec

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def k(self) -> int | None:
        return self.activation.k

    @classmethod
    def from_tensors(
        cls,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        activation: str | Activation = "relu",
        *,
        threshold: Tensor | None = None,
        **kwargs: Any,
    ) -> Dictionary:
        """Wrap existing tensors (copied); shapes are checked and named in errors."""
        d_in, n = W_enc.shape if W_enc.dim() == 2 else (None, None)
        if d_in is None:
            raise ValueError(f"W_enc must be (d_in, d_sae), got {tuple(W_enc.shape)}")
        expected = {"b_enc": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
        if threshold is not None:
            expected["threshold"] = (n,)
        tensors = {"b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold}
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"{name} has shape {tuple(tensors[name].shape)}, expected {shape} for W_enc of shape {(d_in, n)}"
                )
        if threshold is not None:
            activation = JumpReLU(threshold.clone())
        d = cls(d_in, n, activation, dtype=W_enc.dtype, device=W_enc.device, **kwargs)
        with torch.no_grad():
            for param, value in ((d.W_enc, W_enc), (d.b_enc, b_enc), (d._W_dec, W_dec)):
                param.copy_(value)
            d.b_dec.copy_(b_dec)
        return d

    def prepare_input(self, x: Tensor) -> Tensor:
        """x (..., m) cast to the dictionary's dtype (as SAELens does) and moved into its
        training convention (e.g. centred): what ``encode`` reads and ``decode`` rebuilds."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x has width {x.shape[-1]}, the dictionary expects {self.d_in}")
        return self.capture_convention.apply(x.to(self.dtype))

    def pre_activations(self, x: Tensor) -> Tensor:
        """Encoder pre-activations (..., n), in the dictionary's dtype."""
        x = self.prepare_input(x)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        if self.fused_encoder_bias:
            pre = F.linear(x, self.W_enc.T, self.b_enc)
        else:
            pre = x @ self.W_enc + self.b_enc
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self._W_dec.norm(dim=-1)
        return pre

    def encode(self, x: Tensor, *, sparse: bool = False, k: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Codes of x (..., m): dense (..., n), or with ``sparse=True`` the k largest as
        (indices (..., k) int64, values (..., k)), never materialising dense codes."""
        pre = self.pre_activations(x)
        if sparse:
            return self.activation.sparse(pre, k)
        return self.activation.dense(pre)

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction (..., m) from dense codes (..., n)."""
        codes = codes.to(self.dtype)
        if self.rescale_acts_by_decoder_norm:
            codes = codes * (1 / self._W_dec.norm(dim=-1))
        return codes @ self._W_dec + self.b_dec

    def decode_sparse(self, indices: Tensor, values: Tensor) -> Tensor:
        """Reconstruction (..., m) from sparse codes, indices/values (..., k)."""
        lead = indices.shape[:-1]
        values = values.to(self.dtype)
        if self.rescale_acts_by_decoder_norm:
            values = values * (1 / self._W_dec.norm(dim=-1))[indices]
        out = F.embedding_bag(
            indices.reshape(-1, indices.shape[-1]),
            self._W_dec,
            per_sample_weights=values.reshape(-1, values.shape[-1]),
            mode="sum",
        )
        return (out + self.b_dec).reshape(*lead, self.d_in)

    def extra_repr(self) -> str:
        flags = [f for f in ("rescale_acts_by_decoder_norm", "transcoder") if getattr(self, f)]
        extra = "".join(f", {f}=True" for f in flags)
        return f"d_in={self.d_in}, n_features={self.n_features}, activation={self.activation.name}{extra}"


class NeuronBasis(FeatureBasis):
    """The trivial dictionary: feature i is neuron i (codes = x, ``W_dec`` = identity (m, m)).

    Holds no parameters, so it costs nothing at d_ff = 16k.
    """

    def __init__(self, m: int) -> None:
        super().__init__()
        if m < 1:
            raise ValueError(f"m must be positive, got {m}")
        self.d_in = self.n_features = m

    @property
    def W_dec(self) -> Tensor:
        return torch.eye(self.d_in)

    def encode(self, x: Tensor, *, sparse: bool = False, k: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """x itself, or its k largest-magnitude neurons as (indices, values)."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x has width {x.shape[-1]}, the neuron basis has {self.d_in}")
        if sparse:
            k = min(k if k is not None else self.d_in, self.d_in)
            indices = x.abs().topk(k, dim=-1, sorted=False).indices
            return indices, x.gather(-1, indices)
        return x

    def decode(self, codes: Tensor) -> Tensor:
        return codes

    def extra_repr(self) -> str:
        return f"m={self.d_in}"
