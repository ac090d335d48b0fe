"""sparsify folders (``cfg.json`` + ``sae.safetensors``, one per hookpoint of a run): read one as a TopK SAE.

What is read and refused is specified in :mod:`circuitsae.dictionaries.formats.core`; the class is the
registry's reader of sparsify's ``activation`` (``reads["sparsify"]``: TopK reads ``topk``).
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
from circuitsae.errors import CircuitSAEError
from circuitsae.sites import module_site


def read_sparsify(path: "str | Path") -> Dictionary:
    """A sparsify folder (``cfg.json`` + ``sae.safetensors``; a run's hookpoint subfolder) as a TopK SAE."""
    path = Path(path)
    cfg_path, weights = path / "cfg.json", path / "sae.safetensors"
    cfg = read_json(cfg_path)
    where = str(cfg_path)
    if not isinstance(cfg, dict):
        raise CircuitSAEError(f"{where} is not a sparsify config (a JSON object expected)")
    if flag(cfg, "transcode", where, False):
        raise CircuitSAEError(f"{where}: a sparsify transcoder (transcode: true) maps a module's input to its output; "
                              "a dictionary reconstructs its input")  # fmt: skip
    if flag(cfg, "skip_connection", where, False):
        raise CircuitSAEError(f"{where}: a sparsify coder with a skip connection (W_skip) is not supported")
    supported = registry.read_names("sparsify")
    activation = optional(cfg, "activation", where, str, "topk")
    if activation not in supported:
        raise CircuitSAEError(
            f"{where}: sparsify activation {activation!r} is not supported (supported: {', '.join(supported)})"
        )
    if flag(cfg, "signed", where, False):
        raise CircuitSAEError(f"{where}: a signed sparsify TopK (signed: true) is not supported")
    d, k = positive_int(cfg, "d_in", where), positive_int(cfg, "k", where)
    n = cfg.get("num_latents")  # 0 (sparsify's default): expansion_factor · d_in
    m = (
        d * positive_int(cfg, "expansion_factor", where)
        if n is None or n == 0
        else positive_int(cfg, "num_latents", where)
    )
    tensors = load_safetensors(weights)
    if "W_skip" in tensors:
        raise CircuitSAEError(f"{weights}: a sparsify coder with a skip connection (W_skip) is not supported")
    # encoder.weight [d_sae, d_in] (nn.Linear) and W_dec [d_sae, d_in]; when d_in == d_sae that convention holds
    shapes = {"encoder.weight": (m, d), "encoder.bias": (m,), "W_dec": (m, d), "b_dec": (d,)}
    check_tensors(str(weights), tensors, shapes, f"sparsify TopK coder (d_in={d}, num_latents={m})")
    t = {k_: f32(v) for k_, v in tensors.items()}
    kind = registry.reader("sparsify", activation).architecture
    parts = Parts(
        kind, d, m, W_enc=t["encoder.weight"], W_dec=t["W_dec"], b_dec=t["b_dec"], b_enc=t["encoder.bias"], k=k
    )
    hookpoint, run = path.name, path.parent
    if re.fullmatch(r"seed\d+", hookpoint):  # several seeds: <run>/<hookpoint>/seedN
        hookpoint, run = run.name, run.parent
    run_cfg = read_json(run / "config.json") if (run / "config.json").is_file() else {}
    run_cfg = run_cfg if isinstance(run_cfg, dict) else {}
    optional(run_cfg, "model", str(run / "config.json"), str)
    optional(run_cfg, "ctx_len", str(run / "config.json"), int)
    meta: dict[str, Any] = {}
    if run_cfg.get("model"):
        meta["model"] = run_cfg["model"]
    site = module_site(hookpoint, run_cfg.get("model"), relative=True)
    if site:
        meta["site"] = site
    if run_cfg.get("ctx_len") is not None:
        meta["context_size"] = run_cfg["ctx_len"]
    meta["source"] = {"format": "sparsify", "path": str(path), "hookpoint": hookpoint, "cfg": cfg}
    if run_cfg:
        meta["source"]["run_config"] = run_cfg
    if not site:
        meta["source"]["unmapped_hook"] = hookpoint
    return build(parts, str(weights), meta)


__all__ = ["read_sparsify"]
