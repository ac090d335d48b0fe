"""Sites: where in the model activations live, named ``kind.layer``.

=========  ==================================================================
name       meaning
=========  ==================================================================
resid.L    output of decoder block L: the residual stream after block L
mlp.L      output of block L's MLP (before it is added to the residual)
attn.L     output of block L's attention (before it is added to the residual)
=========  ==================================================================

Layers count from 0. The mapping from a site to a module is one table per
architecture family (:data:`ARCHITECTURES`), keyed by the Hugging Face
``config.model_type``. Inside a block the forward order is attn < mlp < resid,
which is the order in which nnsight must visit them (:func:`forward_order`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from circuitsae.errors import CircuitSAEError

KINDS = ("attn", "mlp", "resid")  # in forward order within one block


@dataclass(frozen=True)
class Layout:
    """Where the blocks and their sub-modules sit in one architecture family."""

    blocks: str  # dotted path from the top module to the list of blocks
    attn: str  # attribute of a block holding its attention module
    mlp: str  # attribute of a block holding its MLP module


_LLAMA = Layout(blocks="model.layers", attn="self_attn", mlp="mlp")

#: model_type -> layout. Llama, GPT-2 and GPT-NeoX (Pythia) are tested; the
#: others share Llama's module names exactly.
ARCHITECTURES: dict[str, Layout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": Layout(blocks="transformer.h", attn="attn", mlp="mlp"),
    "gpt_neox": Layout(blocks="gpt_neox.layers", attn="attention", mlp="mlp"),
}

_SITE_RE = re.compile(r"^(resid|mlp|attn)\.(\d+)$")


@dataclass(frozen=True, order=True)
class Site:
    """One site: ``kind`` in ``("attn", "mlp", "resid")`` and a block index."""

    layer: int
    kind: str

    @classmethod
    def parse(cls, name: "str | Site") -> "Site":
        """Parse ``"resid.3"`` (or pass a Site through)."""
        if isinstance(name, Site):
            return name
        m = _SITE_RE.match(str(name).strip())
        if not m:
            raise CircuitSAEError(f"unknown site {name!r}: a site is resid.L, mlp.L or attn.L with L a layer number")
        return cls(layer=int(m.group(2)), kind=m.group(1))

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.layer}"

    def __str__(self) -> str:
        return self.name

    def sort_key(self) -> tuple[int, int]:
        """Forward-pass order: by layer, then attn < mlp < resid."""
        return (self.layer, KINDS.index(self.kind))


def _hf_module(model: Any) -> Any:
    """The underlying torch module of an nnsight model (or the module itself)."""
    return getattr(model, "_module", model)


def layout(model: Any) -> Layout:
    """The :class:`Layout` of a (nnsight-wrapped or plain) HF model."""
    model_type = getattr(_hf_module(model).config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise CircuitSAEError(
            f"unsupported architecture {model_type!r}: sites are defined for {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def n_layers(model: Any) -> int:
    """Number of decoder blocks."""
    cfg = _hf_module(model).config
    return int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)


def d_model(model: Any) -> int:
    """Width of the residual stream (also the width of every mlp/attn site)."""
    cfg = _hf_module(model).config
    return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)


def resolve(model: Any, names: "Iterable[str | Site]") -> list[Site]:
    """Parse and validate site names for ``model``; return them in forward order.

    Raises :class:`CircuitSAEError` naming the valid sites if one is unknown or
    out of range, or if the list is empty or repeats a site.
    """
    sites = [Site.parse(n) for n in names]
    if not sites:
        raise CircuitSAEError("no site given: name at least one, e.g. resid.3")
    layout(model)  # unsupported architectures fail here, with the list
    n = n_layers(model)
    for s in sites:
        if not 0 <= s.layer < n:
            raise CircuitSAEError(
                f"site {s} is out of range: this model has layers 0..{n - 1}, "
                f"so valid sites are resid.L, mlp.L, attn.L for L in 0..{n - 1}"
            )
    if len(set(sites)) != len(sites):
        raise CircuitSAEError(f"a site is named twice in {[str(s) for s in sites]}")
    return sorted(sites, key=Site.sort_key)


def module(model: Any, site: "str | Site") -> Any:
    """The module (an nnsight Envoy when ``model`` is wrapped) whose output is ``site``."""
    site = Site.parse(site)
    lay = layout(model)
    blocks = model
    for part in lay.blocks.split("."):
        blocks = getattr(blocks, part)
    block = blocks[site.layer]
    if site.kind == "resid":
        return block
    return getattr(block, lay.attn if site.kind == "attn" else lay.mlp)


def read(model: Any, site: "str | Site") -> Any:
    """Inside an nnsight trace: the activation tensor ``[batch, seq, d]`` at ``site``.

    Attention modules return ``(output, weights)``; this returns the output.
    """
    out = module(model, site).output
    return out[0] if isinstance(out, tuple) else out
