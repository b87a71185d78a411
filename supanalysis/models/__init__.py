"""Models: a built-in TinyTransformer, local loading, architecture specs, shape description."""

from .arch import ARCHITECTURES, ArchSpec, arch_of, register_architecture
from .describe import ModelShape, describe
from .load import load
from .tiny import TinyConfig, TinyTransformer

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ModelShape",
    "TinyConfig",
    "TinyTransformer",
    "arch_of",
    "describe",
    "load",
    "register_architecture",
]
