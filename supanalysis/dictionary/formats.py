"""Dictionary folders on disk, one registry: SAELens (:mod:`.saelens`) and EleutherAI
sparsify (:mod:`.sparsify`).

Only safetensors and JSON are read; nothing is unpickled. Loading checks every tensor's
presence and shape and names the offending one; a setting the reference library would apply
and this one cannot is refused, naming the setting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._io import CFG
from .base import Dictionary
from .saelens import SAELENS_SPARSITY, SAELENS_WEIGHTS, load_saelens, save_saelens
from .sparsify import SPARSIFY_WEIGHTS, load_sparsify, save_sparsify

__all__ = [
    "CFG",
    "FORMATS",
    "SAELENS_SPARSITY",
    "SAELENS_WEIGHTS",
    "SPARSIFY_WEIGHTS",
    "DictionaryFormat",
    "load_dictionary",
    "load_saelens",
    "load_sparsify",
    "save_dictionary",
    "save_saelens",
    "save_sparsify",
]


# registry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DictionaryFormat:
    """One on-disk format: how to recognise, read and write it.

    Attributes:
        name: registry key.
        weights_file: the file whose presence identifies the format.
        load: folder -> Dictionary.
        save: (Dictionary, folder) -> folder.
    """

    name: str
    weights_file: str
    load: Callable[[str | Path], Dictionary]
    save: Callable[[Dictionary, str | Path], Path]


FORMATS: dict[str, DictionaryFormat] = {
    "saelens": DictionaryFormat("saelens", SAELENS_WEIGHTS, load_saelens, save_saelens),
    "sparsify": DictionaryFormat("sparsify", SPARSIFY_WEIGHTS, load_sparsify, save_sparsify),
}


def load_dictionary(folder: str | Path, format: str | None = None) -> Dictionary:
    """Load a dictionary folder; ``format=None`` detects it from the weights file name."""
    folder = Path(folder)
    if format is None:
        found = [f for f in FORMATS.values() if (folder / f.weights_file).is_file()]
        if len(found) != 1:
            files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no folder"
            raise ValueError(
                f"cannot tell the format of {folder} (files: {files}); expected one of "
                + ", ".join(f"{f.weights_file} ({f.name})" for f in FORMATS.values())
            )
        return found[0].load(folder)
    if format not in FORMATS:
        raise ValueError(f"format={format!r} unknown; registered: {sorted(FORMATS)}")
    return FORMATS[format].load(folder)


def save_dictionary(d: Dictionary, folder: str | Path, format: str = "saelens") -> Path:
    """Save ``d`` in ``format`` (``"saelens"`` or ``"sparsify"``)."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} unknown; registered: {sorted(FORMATS)}")
    return FORMATS[format].save(d, folder)
