"""SAE Lens folders: read one (v6 nested config, or the flat configs of SAE Lens < 6), write one.

What is read and refused, and how, is specified in :mod:`circuitsae.dictionaries.formats.core`; which
circuitsae class a SAE Lens architecture becomes is what the registry's classes declare they read
(``reads["saelens"]``). :func:`write_saelens` is :mod:`circuitsae.dictionaries.writers`'s, which
``Dictionary.save(path, format="saelens")`` calls: it lives below the dictionary classes, so ``base`` can use
it without importing the readers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from circuitsae.dictionaries import registry
from circuitsae.dictionaries.base import Dictionary
from circuitsae.dictionaries.formats.core import (
    Parts,
    build,
    check_tensors,
    f32,
    load_safetensors,
    positive_int,
    read_json,
)
from circuitsae.dictionaries.integrity import flag, optional
from circuitsae.dictionaries.writers import SAELENS_LAYOUT_VERSION, write_saelens
from circuitsae.errors import CircuitSAEError
from circuitsae.sites import module_site, transformer_lens_site

#: the SAE Lens architectures some registered class is read from (a live view of the registry)
SAELENS_ARCHITECTURES = registry.Names(lambda: registry.read_names("saelens"))

_SAELENS_META = (
    "model_name",
    "hook_name",
    "hook_head_index",
    "model_class_name",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "neuronpedia_id",
    "sae_lens_version",
    "sae_lens_training_version",
)


#: the types of the metadata keys the reader uses
_META_TYPES = {
    "model_name": str,
    "hook_name": str,
    "hook_head_index": int,
    "context_size": int,
    "model_from_pretrained_kwargs": dict,
    "circuitsae": dict,
}


def _major(version: Any) -> int:
    m = re.match(r"\s*(\d+)", str(version or ""))
    return int(m.group(1)) if m else 0


def _saelens_cfg(cfg: dict, where: str) -> tuple[dict, dict]:
    """(settings, metadata) of a v6 nested or a pre-6 flat SAE Lens config, as SAE Lens 6 normalises them."""
    nested = optional(cfg, "metadata", where, dict, {})
    version = cfg.get("sae_lens_version") or nested.get("sae_lens_version")
    if _major(version) >= 6:
        return dict(cfg), dict(nested)
    renames = {
        "hook_point": "hook_name",
        "hook_point_head_index": "hook_head_index",
        "activation_fn_str": "activation_fn",
    }
    c = {renames.get(k, k): v for k, v in cfg.items()}
    c.setdefault("apply_b_dec_to_input", True)
    c.setdefault("architecture", "standard")
    c.setdefault("reshape_activations", "hook_z" if "hook_z" in str(c.get("hook_name", "")) else "none")
    act = c.get("activation_fn") or "relu"
    if act == "topk":
        k = optional(c, "activation_fn_kwargs", where, dict, {}).get("k")
        if k is None:
            raise CircuitSAEError(f"{where}: activation_fn 'topk' without activation_fn_kwargs.k")
        c["architecture"], c["k"] = "topk", k
    elif act != "relu":
        raise CircuitSAEError(f"{where}: activation_fn {act!r} is not supported (relu and topk are)")
    norm = c.get("normalize_activations")
    c["normalize_activations"] = (
        "none" if norm in (None, False) else "expected_average_only_in" if norm is True else norm
    )
    return c, {k: c[k] for k in _SAELENS_META if k in c}


def read_saelens(path: "str | Path") -> Dictionary:
    """A SAE Lens folder (v6 or older flat config) as the circuitsae class computing the same codes."""
    path = Path(path)
    cfg_path, weights = path / "cfg.json", path / "sae_weights.safetensors"
    raw = read_json(cfg_path)
    if not isinstance(raw, dict):
        raise CircuitSAEError(f"{cfg_path} is not a SAE Lens config (a JSON object expected)")
    c, smeta = _saelens_cfg(raw, str(cfg_path))
    arch = c.get("architecture")
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        raise CircuitSAEError(
            f"{cfg_path}: architecture {arch!r} is SAE Lens's training form (its threshold is a training "
            "buffer); save it with save_inference_model, which writes it as jumprelu"
        )
    supported = registry.read_names("saelens")
    if arch not in supported:
        kind = (
            " (a transcoder maps one site to another; a dictionary reconstructs its input)"
            if "transcoder" in str(arch)
            else ""
        )
        raise CircuitSAEError(
            f"{cfg_path}: SAE Lens architecture {arch!r} is not supported{kind} (supported: {', '.join(supported)})"
        )
    d, m = positive_int(c, "d_in", str(cfg_path)), positive_int(c, "d_sae", str(cfg_path))
    centred = flag(c, "apply_b_dec_to_input", str(cfg_path), True)
    norm = optional(c, "normalize_activations", str(cfg_path), str, "none")
    for key, kind in _META_TYPES.items():
        optional(smeta, key, str(cfg_path), kind)
    if norm != "none":
        why = {
            "expected_average_only_in": "its scaling factor is not in the folder (fold it first with SAE Lens's "
            "fold_activation_norm_scaling_factor, which sets 'none')",
            "constant_norm_rescale": "it rescales every token to norm √d_in, which no dictionary here can hold",
            "layer_norm": "it layer-normalises every token, which no dictionary here can hold",
            "covariance_whitening": "the whitening statistics are not in the folder (SAE Lens's trainer folds them "
            "before saving)",
        }.get(norm, "only 'none' is")
        raise CircuitSAEError(f"{cfg_path}: normalize_activations={norm!r} is not supported: {why}")
    if c.get("reshape_activations", "none") != "none":
        raise CircuitSAEError(
            f"{cfg_path}: reshape_activations={c['reshape_activations']!r} is not supported (a dictionary here "
            "reads one site's [d] vector, not per-head hook_z activations)"
        )
    if c.get("finetuning_scaling_factor"):
        raise CircuitSAEError(f"{cfg_path}: a finetuning_scaling_factor is not supported (SAE Lens 6 drops it too)")
    tensors = load_safetensors(weights)
    sf = tensors.pop("scaling_factor", None)
    if sf is not None and not bool((sf == 1).all()):
        raise CircuitSAEError(
            f"{weights}: a scaling_factor other than 1 (a finetuning scaling factor) is not supported"
        )
    if arch == "jumprelu" and "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()  # older SAE Lens checkpoints, as SAE Lens converts
    shapes = {"W_enc": (d, m), "W_dec": (m, d), "b_dec": (d,)}
    shapes |= {"b_gate": (m,), "r_mag": (m,), "b_mag": (m,)} if arch == "gated" else {"b_enc": (m,)}
    if arch == "jumprelu":
        shapes["threshold"] = (m,)
    check_tensors(str(weights), tensors, shapes, f"SAE Lens {arch} SAE (d_in={d}, d_sae={m})")
    t = {k: f32(v) for k, v in tensors.items()}
    # SAE Lens stores W_enc [d_in, d_sae] (x @ W_enc) and W_dec [d_sae, d_in]; when d_in == d_sae the shapes
    # cannot tell a transposed W_enc, and SAE Lens's convention is taken.
    ours = smeta.get("circuitsae") if isinstance(smeta.get("circuitsae"), dict) else {}
    # the class: the registry's reader of this architecture, or the one a circuitsae round trip recorded
    cls = registry.reader("saelens", arch, preferred=ours.get("architecture"))
    parts = Parts(
        registry.reader("saelens", arch).architecture,
        d,
        m,
        W_enc=t["W_enc"].T,
        W_dec=t["W_dec"],
        b_dec=t["b_dec"],
        b_enc=t.get("b_enc"),
        b_gate=t.get("b_gate"),
        r_mag=t.get("r_mag"),
        b_mag=t.get("b_mag"),
        threshold=t.get("threshold"),
        centred=centred,
    )
    if arch == "topk":
        parts.k = positive_int(c, "k", str(cfg_path))
        parts.rescale = flag(c, "rescale_acts_by_decoder_norm", str(cfg_path), False)
    stored = dict(raw)  # the file's config, less circuitsae's own block (restored into meta below)
    if isinstance(raw.get("metadata"), dict):
        stored["metadata"] = {k: v for k, v in raw["metadata"].items() if k != "circuitsae"}
    meta: dict[str, Any] = dict(ours.get("meta") or {}) if isinstance(ours.get("meta"), dict) else {}
    meta.pop("codes_scaled_by_decoder_norm", None)
    source: dict[str, Any] = {"format": "saelens", "path": str(path), "architecture": arch, "cfg": stored}
    if smeta.get("model_name"):
        meta["model"] = smeta["model_name"]
    hook = smeta.get("hook_name")
    if hook:
        source["hook_name"] = hook
        site = None
        kwargs = smeta.get("model_from_pretrained_kwargs") or {}
        if smeta.get("hook_head_index") is None and not (
            isinstance(kwargs, dict) and kwargs.get("center_writing_weights")
        ):
            site = transformer_lens_site(hook) or module_site(hook, smeta.get("model_name"))
        if site:
            meta["site"] = site
        else:
            meta.pop("site", None)  # a site restored from circuitsae's block must agree with the hook
            source["unmapped_hook"] = hook
    if smeta.get("context_size") is not None:
        meta["context_size"] = smeta["context_size"]
    meta["source"] = source
    restore = ours.get("config") if isinstance(ours.get("config"), dict) else {}
    return build(parts, str(weights), meta, cls, restore, ours.get("architecture"))


__all__ = ["SAELENS_ARCHITECTURES", "SAELENS_LAYOUT_VERSION", "read_saelens", "write_saelens"]
