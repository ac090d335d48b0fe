"""Dictionaries: baseline, Gated, TopK, BatchTopK and JumpReLU SAEs, PCA and the neuron basis, one interface.

``load_dictionary(path)`` reads a folder written by ``Dictionary.save`` and
returns the class :mod:`.registry` names by ``cfg.json``'s ``architecture``; it also
reads SAE Lens, dictionary_learning and sparsify folders (:mod:`.formats`), and
``dictionary.save(path, format="saelens")`` writes a SAE Lens folder.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import safetensors.torch
import torch

from circuitsae.dictionaries import registry
from circuitsae.dictionaries.base import (
    Dictionary,
    Loss,
    Output,
    TrainableDictionary,
    TrainingDefaults,
    unit_rows,
)
from circuitsae.dictionaries.batchtopk import BatchTopKSAE
from circuitsae.dictionaries.formats import detect_format, read_foreign
from circuitsae.dictionaries.gated import GatedSAE
from circuitsae.dictionaries.jumprelu import JumpReLUSAE
from circuitsae.dictionaries.linear import IdentityDictionary, PCADictionary
from circuitsae.dictionaries.relu import ReluSAE
from circuitsae.dictionaries.topk import TopKSAE
from circuitsae.dictionaries.writers import FORMAT
from circuitsae.errors import CircuitSAEError


def load_dictionary(path: "str | Path", device: "str | torch.device" = "cpu") -> Dictionary:
    """Load a dictionary folder (``sae.safetensors`` + ``cfg.json``); the class comes from ``cfg.json``.

    A SAE Lens, dictionary_learning or sparsify folder is recognised and read into the class that
    computes the same codes (:mod:`circuitsae.dictionaries.formats`), or refused in one sentence.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt != "circuitsae":
        return read_foreign(path, fmt).to(device)
    cfg_path = path / "cfg.json"
    if not cfg_path.is_file():
        what = "does not exist" if not path.exists() else "has no cfg.json"
        raise CircuitSAEError(f"{path} {what}: not a saved dictionary (expected sae.safetensors + cfg.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CircuitSAEError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CircuitSAEError(f"{cfg_path} is not a circuitsae dictionary config (format {FORMAT!r} expected)")
    for key in ("architecture", "d", "d_dict"):
        if key not in cfg:
            raise CircuitSAEError(f"{cfg_path} lacks the key {key!r}")
    if cfg["architecture"] not in registry.names():
        raise CircuitSAEError(
            f"{cfg_path}: unknown architecture {cfg['architecture']!r} (known: {', '.join(registry.names())})"
        )
    cls = registry.get(cfg["architecture"])
    params = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    args = {k: cfg[k] for k in params if k in cfg}
    dictionary = cls(**args)
    weights = path / "sae.safetensors"
    expected = dictionary.state_dict()
    if expected:
        if not weights.is_file():
            raise CircuitSAEError(f"{path} has cfg.json but no sae.safetensors")
        try:
            tensors = safetensors.torch.load_file(weights)
        except Exception as e:  # safetensors raises several types for a bad header
            raise CircuitSAEError(f"{weights} is not a readable safetensors file ({e})") from None
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise CircuitSAEError(
                f"{weights} does not match its cfg.json ({cls.__name__}): missing {missing}, unexpected {extra}"
            )
        for k, v in tensors.items():
            if v.shape != expected[k].shape:
                raise CircuitSAEError(
                    f"{weights}: {k} has shape {tuple(v.shape)} but cfg.json implies {tuple(expected[k].shape)}"
                )
        dictionary.load_state_dict(tensors)
    dictionary.meta = {k: v for k, v in cfg.items() if k not in ("format", "architecture", *args)}
    return dictionary.to(device)


__all__ = [
    "BatchTopKSAE",
    "Dictionary",
    "GatedSAE",
    "IdentityDictionary",
    "JumpReLUSAE",
    "Loss",
    "Output",
    "PCADictionary",
    "ReluSAE",
    "TopKSAE",
    "TrainableDictionary",
    "TrainingDefaults",
    "load_dictionary",
    "registry",
    "unit_rows",
]
