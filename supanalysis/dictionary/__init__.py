"""Dictionaries: turn activations (T, m) into features (neuron basis or sparse dictionary)."""

from .activations import ACTIVATIONS, Activation, GroupMax, JumpReLU, ReLU, TopK, register_activation
from .base import Dictionary, FeatureBasis, NeuronBasis
from .convention import RAW, CaptureConvention, check_dictionary_site, convention_from_tl_kwargs
from .formats import (
    FORMATS,
    DictionaryFormat,
    load_dictionary,
    load_saelens,
    load_sparsify,
    save_dictionary,
    save_saelens,
    save_sparsify,
)
from .metrics import evaluate_sae, fvu
from .train import TopKTrainConfig, TrainResult, train_topk_sae

__all__ = [
    "ACTIVATIONS",
    "FORMATS",
    "RAW",
    "Activation",
    "CaptureConvention",
    "Dictionary",
    "DictionaryFormat",
    "FeatureBasis",
    "GroupMax",
    "JumpReLU",
    "NeuronBasis",
    "ReLU",
    "TopK",
    "TopKTrainConfig",
    "TrainResult",
    "check_dictionary_site",
    "convention_from_tl_kwargs",
    "evaluate_sae",
    "fvu",
    "load_dictionary",
    "load_saelens",
    "load_sparsify",
    "register_activation",
    "save_dictionary",
    "save_saelens",
    "save_sparsify",
    "train_topk_sae",
]
