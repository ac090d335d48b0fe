"""Splice dictionaries into a model's forward pass through nnsight.

The primitive everything later uses: at each chosen site the activation x is
replaced by the dictionary's reconstruction x̂ (or by x̂ + (x − x̂), which
keeps the reconstruction error and must leave the model unchanged), at every
position from ``start`` on.

**choice** — positions before the dictionary's ``first_position`` (the BOS
token, when the store skipped it) are left alone by default: the dictionary
never saw them, and SmolLM2's BOS residual is a huge outlier whose
reconstruction would dominate every metric. Pass ``start=0`` to splice there too.

**Devices and dtypes.** A dictionary handed to any function that runs a model is
moved to the device of the module at its site (:func:`site_device`; with a
``device_map`` that is where accelerate runs that module), before any trace
starts, so no device error can surface from inside one. It keeps its own dtype
(float32, usually): activations are cast to it to encode and decode, and the
result is cast back to the model's dtype (bfloat16, say) where it is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from circuitsae import sites as sites_mod
from circuitsae.dictionaries import Dictionary
from circuitsae.errors import CircuitSAEError
from circuitsae.models import input_device, model_name, module_device


def site_device(model: Any, site: "str | sites_mod.Site") -> torch.device:
    """The device the module at ``site`` computes on (its activations live there)."""
    return module_device(model, sites_mod.path(model, site))


def check_dictionary(model: Any, site: "str | sites_mod.Site", dictionary: Dictionary) -> Dictionary:
    """Check that ``dictionary`` was made for this width, site and model, and move it to the site's device.

    Raises a one-line error otherwise. The move is in place (``Module.to``); the dictionary is returned.
    """
    site = str(sites_mod.Site.parse(site))
    sites_mod.resolve(model, [site])
    d = sites_mod.d_model(model)
    if dictionary.d != d:
        raise CircuitSAEError(
            f"the {dictionary.architecture} dictionary has d={dictionary.d} but site {site} of "
            f"{model_name(model)} has d={d}"
        )
    trained_site = dictionary.meta.get("site")
    if trained_site is not None and trained_site != site:
        raise CircuitSAEError(
            f"the {dictionary.architecture} dictionary was trained on site {trained_site}, not {site}"
        )
    trained_model = dictionary.meta.get("model")
    if trained_model is not None and trained_model != model_name(model):
        raise CircuitSAEError(
            f"the {dictionary.architecture} dictionary was trained on {trained_model}, not {model_name(model)}"
        )
    return place(dictionary, site_device(model, site), f"site {site} of {model_name(model)}")


def place(dictionary: Dictionary, device: torch.device, where: str) -> Dictionary:
    """Move ``dictionary`` to ``device`` (in place), or raise one sentence naming both devices."""
    here = dictionary.W_dec.device
    if here == device:
        return dictionary
    if here.type == "meta":
        raise CircuitSAEError(
            f"the {dictionary.architecture} dictionary is on the meta device (no values), {where} is on {device}: "
            "load its weights first (load_dictionary)"
        )
    try:
        return dictionary.to(device)
    except (RuntimeError, AssertionError) as e:
        raise CircuitSAEError(
            f"cannot move the {dictionary.architecture} dictionary from {here} to {device}, where {where} runs "
            f"({str(e).splitlines()[0][:120]})"
        ) from None


def default_start(dictionary: "Dictionary | None") -> int:
    """First position a dictionary applies to (1 when it was trained without the BOS token)."""
    return int(dictionary.meta.get("first_position", 0)) if dictionary is not None else 0


def write(model: Any, site: "str | sites_mod.Site", value: torch.Tensor, start: int = 0) -> None:
    """Inside an nnsight trace: overwrite ``site``'s activation at positions ``start:`` with ``value``."""
    out = sites_mod.module(model, site).output
    target = out[0] if isinstance(out, tuple) else out
    target[:, start:] = value


def splice_sites(
    model: Any,
    dictionaries: Mapping[str, Dictionary],
    *,
    keep_error: bool = False,
    start: "int | None" = None,
) -> None:
    """Inside an nnsight trace: replace each site's activation by its dictionary's reconstruction.

    With ``keep_error=True`` the site gets x̂ + (x − x̂): the model's output must
    then equal the clean run's to float tolerance (the plumbing check).
    Sites are visited in forward order.
    """
    order = sites_mod.resolve(model, list(dictionaries))
    placed = {str(s): check_dictionary(model, s, dictionaries[str(s)]) for s in order}  # before any tensor meets one
    for site in order:
        dictionary = placed[str(site)]
        s = default_start(dictionary) if start is None else start
        x = sites_mod.read(model, site)[:, s:]
        x_hat = dictionary(x.to(dictionary.W_dec.dtype)).x_hat
        if keep_error:
            x_hat = x_hat + (x.to(x_hat.dtype) - x_hat)
        write(model, site, x_hat.to(x.dtype), s)


def logits_of(model: Any) -> Any:
    """Inside an nnsight trace: the model's output logits ``[batch, seq, vocab]``."""
    return model.output.logits


@torch.no_grad()
def run_spliced(
    model: Any,
    input_ids: torch.Tensor,
    dictionaries: Mapping[str, Dictionary],
    *,
    keep_error: bool = False,
    start: "int | None" = None,
) -> torch.Tensor:
    """Logits of ``model`` on ``input_ids`` with every site in ``dictionaries`` spliced.

    ``run_spliced(model, ids, {"resid.3": sae})``; an empty mapping gives the clean logits.
    """
    for site, dictionary in dictionaries.items():
        check_dictionary(model, site, dictionary)
    with model.trace(input_ids.to(input_device(model))):
        if dictionaries:
            splice_sites(model, dictionaries, keep_error=keep_error, start=start)
        logits = logits_of(model).save()
    return logits


@torch.no_grad()
def run_ablated(model: Any, input_ids: torch.Tensor, sites: "list[str]", start: int = 0) -> torch.Tensor:
    """Logits with each site's activation set to zero at positions ``start:`` (zero-ablation)."""
    order = sites_mod.resolve(model, sites)
    with model.trace(input_ids.to(input_device(model))):
        for site in order:
            x = sites_mod.read(model, site)
            write(model, site, torch.zeros_like(x[:, start:]), start)
        logits = logits_of(model).save()
    return logits
