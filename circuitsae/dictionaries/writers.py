"""Writing a dictionary to a folder: circuitsae's own layout and SAE Lens's (v6).

:meth:`Dictionary.save <circuitsae.dictionaries.base.Dictionary.save>` calls these. They see a dictionary
only through its interface — ``state_dict``, ``config``, ``meta``, ``architecture``, and for SAE Lens the
forms its class declares (``saelens_writes``, ``saelens_form``) — so this module imports no dictionary
class: ``base`` imports it, and :mod:`circuitsae.dictionaries.formats` (whose readers need the classes)
re-exports :func:`write_saelens` beside the SAE Lens reader.

circuitsae: ``sae.safetensors`` (the state dict, CPU, contiguous), ``manifest.json`` (bytes and sha256 of
both files, :mod:`circuitsae.dictionaries.integrity`), then ``cfg.json`` (``format``, ``architecture``, the
constructor arguments, ``meta``), each written atomically, ``cfg.json`` last: it marks the folder complete.

SAE Lens v6: ``sae_weights.safetensors``, ``manifest.json`` (SAE Lens ignores it), then ``cfg.json`` with ``architecture``, ``d_in``, ``d_sae``,
``dtype: float32``, ``device: cpu``, ``apply_b_dec_to_input: true``, ``normalize_activations: none``,
``reshape_activations: none``, the form's own settings (topk: ``k``, ``rescale_acts_by_decoder_norm:
false``: the rows are unit), and ``metadata`` (``model_name``, ``hook_name`` from the site,
``context_size``, ``sae_lens_version: "6.0.0"`` — the config layout it follows, which SAE Lens reads to
choose v6 over the flat loader — and ``circuitsae``: the class, its constructor arguments and ``meta``,
so a round trip restores them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import torch

from circuitsae.dictionaries.integrity import write_folder
from circuitsae.errors import CircuitSAEError
from circuitsae.sites import site_to_hook

#: the circuitsae folder layout's name and version, in every ``cfg.json`` it writes
FORMAT = "circuitsae-dictionary/1"
#: the SAE Lens config layout written (SAE Lens reads ``metadata.sae_lens_version`` < 6 as a flat config)
SAELENS_LAYOUT_VERSION = "6.0.0"


class SAELensForm(NamedTuple):
    """A dictionary as one SAE Lens architecture holds it (what ``saelens_form`` returns)."""

    source: Any  # the Dictionary whose class and constructor arguments the file records (itself, or its export)
    tensors: dict[str, torch.Tensor]  # SAE Lens names and orientation (W_enc [d_in, d_sae]), float32 on the CPU
    settings: dict[str, Any]  # the architecture's own cfg.json keys (topk: k, rescale_acts_by_decoder_norm)


def json_default(o: Any) -> Any:
    """``json.dumps``'s ``default`` for ``cfg.json``: tensors as lists, paths as strings."""
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to cfg.json")


def write_circuitsae(dictionary: Any, path: "str | Path") -> Path:
    """Write ``path/sae.safetensors``, ``path/manifest.json``, then ``path/cfg.json`` (the commit marker)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in dictionary.state_dict().items()}
    cfg = {"format": FORMAT, "architecture": dictionary.architecture, **dictionary.config(), **dictionary.meta}
    files = {
        "sae.safetensors": safetensors.torch.save(tensors),
        "cfg.json": json.dumps(cfg, indent=1, default=json_default).encode(),
    }
    write_folder(path, files, last="cfg.json")
    return path


def write_saelens(dictionary: Any, path: "str | Path", architecture: "str | None" = None) -> Path:
    """Write ``dictionary`` as a SAE Lens v6 folder (``cfg.json`` + ``sae_weights.safetensors``) that SAE Lens loads.

    ``architecture`` chooses among the forms the dictionary's class declares (``saelens_writes``; a Gated SAE:
    ``gated`` or ``jumprelu``); by default the first, its own.
    """
    d = dictionary
    own = d.architecture
    possible = tuple(type(d).saelens_writes)
    if not possible:
        raise CircuitSAEError(
            f"a {own} dictionary cannot be saved in SAE Lens format: SAE Lens has no architecture for "
            f"{type(d).saelens_refusal}"
        )
    arch = architecture or possible[0]
    if arch not in possible:
        raise CircuitSAEError(
            f"a {own} dictionary cannot be saved as SAE Lens {arch!r} (it can be: {', '.join(possible)})"
        )
    form = d.saelens_form(arch)
    exported = form.source
    with torch.no_grad():
        W_dec = exported.W_dec.detach().float().cpu()
        b_dec = exported.b_dec.detach().float().cpu() if exported.b_dec is not None else torch.zeros(d.d)
        tensors = form.tensors | {"W_dec": W_dec, "b_dec": b_dec}
        tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": d.d,
        "d_sae": d.d_dict,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **form.settings,
    }
    meta = dict(d.meta)
    metadata: dict[str, Any] = {"sae_lens_version": SAELENS_LAYOUT_VERSION}
    if meta.get("model"):
        metadata["model_name"] = meta["model"]
    if meta.get("site"):
        metadata["hook_name"] = site_to_hook(meta["site"])
    elif isinstance(meta.get("source"), dict) and meta["source"].get("hook_name"):
        metadata["hook_name"] = meta["source"]["hook_name"]
    if meta.get("context_size") is not None:
        metadata["context_size"] = meta["context_size"]
    from circuitsae import __version__

    # a form the class is not read back from (a Gated SAE as jumprelu, BatchTopK as jumprelu) records its origin
    read_back = arch in type(d).reads.get("saelens", ())
    ours_meta = meta if read_back else {**meta, "exported_from": own}
    metadata["circuitsae"] = {
        "version": __version__,
        "architecture": exported.architecture,
        "config": exported.config(),
        "meta": ours_meta,
    }
    cfg["metadata"] = metadata
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files = {
        "sae_weights.safetensors": safetensors.torch.save(tensors),
        "cfg.json": json.dumps(cfg, indent=1, default=json_default).encode(),
    }
    write_folder(path, files, last="cfg.json")
    return path


__all__ = ["FORMAT", "SAELENS_LAYOUT_VERSION", "SAELensForm", "json_default", "write_circuitsae", "write_saelens"]
