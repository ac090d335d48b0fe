"""Dictionaries: baseline, Gated, TopK, BatchTopK and JumpReLU SAEs, PCA and the neuron basis, one interface.

``load_dictionary(path)`` reads a folder written by ``Dictionary.save`` and
returns the class :mod:`.registry` names by ``cfg.json``'s ``architecture``; it also
reads SAE Lens, dictionary_learning and sparsify folders (:mod:`.formats`), and
``dictionary.save(path, format="saelens")`` writes a SAE Lens folder.
"""

from __future__ import annotations

import math
import warnings
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
from circuitsae.dictionaries.integrity import (
    MANIFEST,
    check_arguments,
    check_finite,
    check_manifest,
    header,
    is_float_dtype,
    optional,
    read_json,
)
from circuitsae.dictionaries.jumprelu import JumpReLUSAE
from circuitsae.dictionaries.linear import IdentityDictionary, PCADictionary
from circuitsae.dictionaries.relu import ReluSAE
from circuitsae.dictionaries.topk import TopKSAE
from circuitsae.dictionaries.writers import FORMAT
from circuitsae.errors import CircuitSAEError
from circuitsae.memory import MemoryPlan


def load_dictionary(path: "str | Path", device: "str | torch.device" = "cpu", verify: bool = True) -> Dictionary:
    """Load a dictionary folder (``sae.safetensors`` + ``cfg.json``); the class comes from ``cfg.json``.

    The folder's ``manifest.json`` is checked first: every file's size, then its sha256 (``verify=False`` or
    ``CIRCUITSAE_VERIFY=0`` skips the hashes and says so in a warning); a folder saved without one loads with
    a one-line warning. ``cfg.json``'s values are checked one by one and the shapes they imply against
    ``sae.safetensors``'s header before any tensor is made; NaN or inf weights are refused naming the tensor.

    A SAE Lens, dictionary_learning or sparsify folder is recognised and read into the class that
    computes the same codes (:mod:`circuitsae.dictionaries.formats`), or refused in one sentence.
    """
    path = Path(path)
    checked = check_manifest(path, verify)
    fmt = detect_format(path)
    if fmt != "circuitsae":
        dictionary = read_foreign(path, fmt)
        dictionary.folder = path
        return dictionary.to(device)
    dictionary = _read_circuitsae(path)
    dictionary.folder = path
    if not checked:
        warnings.warn(
            f"{path} has no {MANIFEST} (saved by an older circuitsae), so its bytes cannot be checked: "
            f"'circuitsae convert {path} NEW --to circuitsae' writes a copy that has one",
            UserWarning,
            stacklevel=2,
        )
    return dictionary.to(device)


def _read_circuitsae(path: Path) -> Dictionary:
    """A circuitsae folder's dictionary, its config and tensors checked before the module is built."""
    cfg_path, weights = path / "cfg.json", path / "sae.safetensors"
    if not cfg_path.is_file():
        what = "does not exist" if not path.exists() else "has no cfg.json"
        raise CircuitSAEError(f"{path} {what}: not a saved dictionary (expected sae.safetensors + cfg.json)")
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        other = "" if isinstance(cfg, dict) and "format" in cfg else ", nor a SAE Lens or sparsify config"
        raise CircuitSAEError(f"{cfg_path} is not a circuitsae dictionary config (format {FORMAT!r} expected){other}")
    for key in ("architecture", "d", "d_dict"):
        if key not in cfg:
            raise CircuitSAEError(f"{cfg_path} lacks the key {key!r}")
    arch = cfg["architecture"]
    if not isinstance(arch, str) or arch not in registry.names():
        raise CircuitSAEError(f"{cfg_path}: unknown architecture {arch!r} (known: {', '.join(registry.names())})")
    cls = registry.get(arch)
    args = check_arguments(cls, cfg, str(cfg_path))
    for key, kind in _META.items():
        optional(cfg, key, str(cfg_path), kind)
    expected, nbytes = _planned(cls, args, cfg_path)  # shapes and dtypes, from a module on the meta device
    tensors: dict[str, torch.Tensor] = {}
    if expected or weights.is_file():
        if not weights.is_file():
            raise CircuitSAEError(f"{path} has cfg.json but no sae.safetensors")
        stored = header(weights)
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        if missing or extra:
            raise CircuitSAEError(
                f"{weights} does not match its cfg.json ({cls.__name__}): missing {missing}, unexpected {extra}"
            )
        for k, (shape, dtype) in stored.items():
            if shape != expected[k][0]:
                raise CircuitSAEError(f"{weights}: {k} has shape {shape} but cfg.json implies {expected[k][0]}")
            if is_float_dtype(dtype) != expected[k][1].is_floating_point:
                raise CircuitSAEError(
                    f"{weights}: {k} is stored as {dtype} but a {cls.__name__} holds {expected[k][1]}"
                )
        stored_bytes = sum(math.prod(s) * t.itemsize for s, t in expected.values())
        MemoryPlan(f"loading {path}").add("the dictionary", nbytes).add("its file's tensors", stored_bytes).check()
        try:
            tensors = safetensors.torch.load_file(weights)
        except Exception as e:  # safetensors raises several types for a bad file
            raise CircuitSAEError(f"{weights} is not a readable safetensors file ({e})") from None
        check_finite(str(weights), tensors, cls.minus_infinity_allowed)
    else:
        MemoryPlan(f"loading {path}").add("the dictionary", nbytes).check()
    dictionary = cls(**args)
    dictionary.load_state_dict(tensors)
    dictionary.meta = {k: v for k, v in cfg.items() if k not in ("format", "architecture", *args)}
    return dictionary


#: ``cfg.json`` keys of a dictionary's ``meta`` that the library reads, and their types
_META = {"model": str, "site": str, "training": dict, "metrics": dict, "source": dict}


def _planned(
    cls: type[Dictionary], args: dict, where: Path
) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], int]:
    """The state dict's shapes and dtypes of ``cls(**args)`` and the bytes the module holds, found on the meta
    device (nothing allocated); the class's own checks of its arguments are one line naming ``where``."""
    try:
        with torch.device("meta"):
            probe = cls(**args)
    except CircuitSAEError as e:
        raise CircuitSAEError(f"{where}: {e}") from None
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        sizes = ", ".join(f"{k}={v!r}" for k, v in args.items() if isinstance(v, int) and not isinstance(v, bool))
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CircuitSAEError(f"{where}: a {cls.__name__} with {sizes} cannot be built ({first})") from None
    tensors = {id(t): t for t in (*probe.parameters(), *probe.buffers())}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return {k: (tuple(v.shape), v.dtype) for k, v in probe.state_dict().items()}, nbytes


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
