"""dictionary_learning folders (``ae.pt`` + ``config.json``): read one as the circuitsae class computing the same codes.

What is read and refused is specified in :mod:`circuitsae.dictionaries.formats.core`; which class each
dictionary_learning class becomes is what the registry's classes declare they read
(``reads["dictionary_learning"]``). This module knows how each of those classes lays out its state dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from circuitsae.dictionaries import registry
from circuitsae.dictionaries.base import Dictionary
from circuitsae.dictionaries.formats.core import Parts, build, check_tensors, f32, positive_int, read_json
from circuitsae.dictionaries.integrity import optional
from circuitsae.errors import CircuitSAEError
from circuitsae.sites import dictionary_learning_site

#: the dictionary_learning classes whose state-dict layout this reader knows
_SHAPES = (
    "AutoEncoder",
    "AutoEncoderNew",
    "GatedAutoEncoder",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "JumpReluAutoEncoder",
)


def read_dictionary_learning(path: "str | Path") -> Dictionary:
    """A dictionary_learning folder (``ae.pt`` + ``config.json``) as the circuitsae class computing the same codes."""
    path = Path(path)
    ae, cfg_path = path / "ae.pt", path / "config.json"
    if not cfg_path.is_file():
        raise CircuitSAEError(
            f"{path} has ae.pt but no config.json, whose trainer.dict_class names the class "
            "(AutoEncoderTopK and BatchTopKSAE hold the same keys and compute different codes)"
        )
    config = read_json(cfg_path)
    trainer = config.get("trainer") if isinstance(config, dict) else None
    if not isinstance(trainer, dict) or "dict_class" not in trainer:
        raise CircuitSAEError(f"{cfg_path} lacks trainer.dict_class (a dictionary_learning config.json has it)")
    cls = trainer["dict_class"]
    supported = registry.read_names("dictionary_learning")
    if cls not in supported or cls not in _SHAPES:
        raise CircuitSAEError(
            f"{cfg_path}: dictionary_learning class {cls!r} is not supported (supported: {', '.join(supported)})"
        )
    d, m = positive_int(trainer, "activation_dim", str(cfg_path)), positive_int(trainer, "dict_size", str(cfg_path))
    for key, kind in {"lm_name": str, "submodule_name": str, "layer": int}.items():
        optional(trainer, key, f"{cfg_path}: trainer", kind)
    buffer = optional(config, "buffer", str(cfg_path), dict, {})
    optional(buffer, "io", f"{cfg_path}: buffer", str)
    optional(buffer, "ctx_len", f"{cfg_path}: buffer", int)
    try:
        sd = torch.load(ae, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors of several types; weights_only refuses arbitrary objects
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CircuitSAEError(f"{ae} is not a state dict torch.load(weights_only=True) can read ({first})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CircuitSAEError(f"{ae} is not a state dict of tensors")
    groups = sd.get("group_sizes")
    groups = (groups.shape[0],) if groups is not None and groups.ndim == 1 else (1,)
    what = f"dictionary_learning {cls} (activation_dim={d}, dict_size={m})"
    linear = {"encoder.weight": (m, d), "decoder.weight": (d, m)}  # nn.Linear stores [out, in]
    raw_params = {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d), "b_dec": (d,)}
    shapes = {
        "AutoEncoder": linear | {"encoder.bias": (m,), "bias": (d,)},
        "AutoEncoderNew": linear | {"encoder.bias": (m,), "decoder.bias": (d,)},
        "GatedAutoEncoder": linear | {"decoder_bias": (d,), "r_mag": (m,), "gate_bias": (m,), "mag_bias": (m,)},
        "AutoEncoderTopK": linear | {"encoder.bias": (m,), "b_dec": (d,), "k": (), "threshold": ()},
        "BatchTopKSAE": linear | {"encoder.bias": (m,), "b_dec": (d,), "k": (), "threshold": ()},
        "MatryoshkaBatchTopKSAE": raw_params | {"k": (), "threshold": (), "group_sizes": groups},
        "JumpReluAutoEncoder": raw_params | {"threshold": (m,)},
    }[cls]
    check_tensors(str(ae), sd, shapes, what)
    t = {k: f32(v) for k, v in sd.items()}
    # encoder.weight [d_sae, d_in] and decoder.weight [d_in, d_sae] (nn.Linear), W_enc [d_in, d_sae] and W_dec
    # [d_sae, d_in] (raw parameters); when d_in == d_sae those conventions are taken.
    if "encoder.weight" in t:
        W_enc, W_dec = t["encoder.weight"], t["decoder.weight"].T
    else:
        W_enc, W_dec = t["W_enc"].T, t["W_dec"]
    buffers: dict[str, Any] = {}
    k = None
    if "k" in sd:
        if sd["k"].is_complex() or float(sd["k"]) != int(sd["k"]):
            raise CircuitSAEError(f"{ae}: the k buffer holds {float(sd['k'])!r}, not a whole number")
        k = int(sd["k"])
        buffers["k"] = k
        if trainer.get("k") is not None and trainer["k"] != k:
            raise CircuitSAEError(f"{path}: config.json says k={trainer['k']!r} but ae.pt's k buffer holds {k}")
    if "threshold" in sd and sd["threshold"].ndim == 0:
        buffers["threshold"] = float(sd["threshold"])
    if cls == "MatryoshkaBatchTopKSAE":
        buffers["group_sizes"] = sd["group_sizes"].tolist()
        if sum(buffers["group_sizes"]) != m:
            raise CircuitSAEError(f"{ae}: group_sizes sum to {sum(buffers['group_sizes'])}, not dict_size={m}")
    kind = registry.reader("dictionary_learning", cls).architecture
    parts = Parts(kind, d, m, W_enc=W_enc, W_dec=W_dec, b_dec=torch.zeros(d), k=k)
    if cls == "AutoEncoder":
        parts.b_enc, parts.b_dec = t["encoder.bias"], t["bias"]
    elif cls == "AutoEncoderNew":  # ReLU(W x + b), x̂ = decoder(f) + decoder.bias: the encoder reads x itself
        parts.b_enc, parts.b_dec, parts.centred = t["encoder.bias"], t["decoder.bias"], False
    elif cls == "GatedAutoEncoder":
        parts.b_dec, parts.b_gate, parts.r_mag, parts.b_mag = (
            t["decoder_bias"],
            t["gate_bias"],
            t["r_mag"],
            t["mag_bias"],
        )
    elif cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        parts.b_enc, parts.b_dec = t["encoder.bias"], t["b_dec"]
        if kind == "batchtopk":
            parts.threshold = t["threshold"]
    else:  # raw parameters: Matryoshka (x − b_dec) @ W_enc; JumpReLU x @ W_enc (apply_b_dec_to_input False)
        parts.b_enc, parts.b_dec = t["b_enc"], t["b_dec"]
        parts.threshold = t["threshold"]
        parts.centred = cls != "JumpReluAutoEncoder"
    meta: dict[str, Any] = {}
    if trainer.get("lm_name"):
        meta["model"] = trainer["lm_name"]
    site = dictionary_learning_site(
        trainer.get("submodule_name"), trainer.get("lm_name"), trainer.get("layer"), buffer.get("io")
    )
    if site:
        meta["site"] = site
    if buffer.get("ctx_len") is not None:
        meta["context_size"] = buffer["ctx_len"]
    meta["source"] = {"format": "dictionary_learning", "path": str(path), "dict_class": cls, "config": config}
    if buffers:
        meta["source"]["buffers"] = buffers
    return build(parts, str(ae), meta)


__all__ = ["read_dictionary_learning"]
