"""Sites: where in the model activations live, named ``kind.layer``.

=========  ==================================================================
name       meaning
=========  ==================================================================
resid.L    output of decoder block L: the residual stream after block L
mlp.L      what block L's MLP adds to the residual stream
attn.L     what block L's attention adds to the residual stream
=========  ==================================================================

So ``resid.L = resid.(L-1) + attn.L + mlp.L`` in every family (with the
embeddings as ``resid.-1``); the tests check it. For Llama, GPT-2, NeoX, Qwen2
and Mistral ``attn.L``/``mlp.L`` are the outputs of the attention and MLP
modules; Gemma 2 and 3 normalise those outputs again before adding them
(``post_attention_layernorm``, ``post_feedforward_layernorm``), so there the
sites are the outputs of those norms.

Layers count from 0. The mapping from a site to a module, and how the fast
paths of :mod:`circuitsae.interventions.replay` run the blocks, is one description per
architecture family (:data:`ARCHITECTURES`), keyed by the Hugging Face
``config.model_type``. Inside a block the forward order is attn < mlp < resid,
which is the order in which nnsight must visit them (:meth:`Site.sort_key`).

Other libraries name sites by hook or module: :func:`transformer_lens_site`, :func:`module_site` and
:func:`dictionary_learning_site` read those names, :func:`site_to_hook` writes SAE Lens's.
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
    """One architecture family: where its sites are, and how its blocks can be run on their own.

    ``blocks_only`` says that the family's decoder blocks can be called directly,
    ``block(h, attention_mask=..., position_ids=..., position_embeddings=...,
    past_key_values=...)``, with the rotary embedding ``model.rotary_emb`` and the
    final norm ``model.norm``: the fast paths of :mod:`circuitsae.interventions.replay` and
    :mod:`circuitsae.circuits.trees` need it; the other families use full forward passes
    with hooks. Which layers use a sliding window and whether logits are capped
    is read from the config (``layer_types``, ``sliding_window``,
    ``final_logit_softcapping``).
    """

    blocks: str  # dotted path from the top module to the list of blocks
    attn: str  # attribute of a block whose output is what attention adds to the residual
    mlp: str  # attribute of a block whose output is what the MLP adds to the residual
    blocks_only: bool = False
    rope_per_layer_type: bool = False  # rotary_emb(h, pos, layer_type): one rotary table per kind of layer
    window_everywhere: bool = False  # every layer uses config.sliding_window (Mistral), not only those typed so
    #: the residual stream exceeds float16's range (Gemma: |x| up to ~1e5 on real weights), so neither the
    #: model nor its stored activations can be float16
    float16_overflows: bool = False


_LLAMA = Layout(blocks="model.layers", attn="self_attn", mlp="mlp", blocks_only=True)
_GEMMA = Layout(blocks="model.layers", attn="post_attention_layernorm", mlp="post_feedforward_layernorm",
                blocks_only=True, float16_overflows=True)  # fmt: skip

#: model_type -> layout. Every family here has a tiny random model and tests (tests/test_families.py).
ARCHITECTURES: dict[str, Layout] = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": Layout(blocks="model.layers", attn="self_attn", mlp="mlp", blocks_only=True, window_everywhere=True),
    "gemma2": _GEMMA,
    "gemma3_text": Layout(**{**_GEMMA.__dict__, "rope_per_layer_type": True}),
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


_PATTERN_RE = re.compile(r"^(resid|mlp|attn|\*)\.([0-9*,\-]+)$")


def is_pattern(name: "str | Site") -> bool:
    """Whether ``name`` names several sites (``all``, ``resid.*``, ``*.3``, ``mlp.10-20``, ``attn.1,4``)."""
    return not isinstance(name, Site) and not _SITE_RE.match(str(name).strip())


def check_pattern(name: "str | Site") -> None:
    """Raise one line if ``name`` is neither a site nor a site pattern (its layers are checked by :func:`expand`)."""
    if isinstance(name, Site) or _SITE_RE.match(str(name).strip()):
        return
    text = str(name).strip()
    m = _PATTERN_RE.match(text)
    if text == "all" or (m and all(re.fullmatch(r"\*|\d+|\d+-\d+", part) for part in m.group(2).split(","))):
        return
    raise CircuitSAEError(
        f"unknown site {name!r}: a site is resid.L, mlp.L or attn.L; a pattern is all, KIND.* (resid.*), *.L, "
        "a range KIND.A-B (resid.10-20) or a list KIND.A,B"
    )


def expand(names: "Iterable[str | Site]", n: int) -> list[Site]:
    """Sites and site patterns expanded for a model of ``n`` layers, in forward order, each site once.

    ``all`` is every site; ``resid.*`` every residual site; ``*.3`` the three sites of layer 3; ``mlp.10-20``
    layers 10 to 20 inclusive; ``attn.1,4,7`` a list. A plain site out of range, a range reaching past the
    last layer, or a pattern that matches nothing is one :class:`CircuitSAEError` line.
    """
    found: list[Site] = []
    plain: list[Site] = []
    for name in names:
        check_pattern(name)
        text = str(name).strip()
        if not is_pattern(name):
            site = Site.parse(name)
            if not 0 <= site.layer < n:
                raise CircuitSAEError(
                    f"site {site} is out of range: this model has layers 0..{n - 1}, "
                    f"so valid sites are resid.L, mlp.L, attn.L for L in 0..{n - 1}"
                )
            plain.append(site)
            found.append(site)
            continue
        kind, spec = ("*", "*") if text == "all" else text.split(".", 1)
        layers: list[int] = []
        for part in spec.split(","):
            if part == "*":
                layers.extend(range(n))
                continue
            a, _, b = part.partition("-")
            lo, hi = int(a), int(b or a)
            if lo > hi or hi >= n:
                raise CircuitSAEError(f"site pattern {text!r}: layers {part} are not within this model's 0..{n - 1}")
            layers.extend(range(lo, hi + 1))
        matched = [Site(layer, k) for layer in layers for k in (KINDS if kind == "*" else (kind,))]
        if not matched:
            raise CircuitSAEError(f"site pattern {text!r} matches no site of this model (layers 0..{n - 1})")
        found.extend(matched)
    if len(set(plain)) != len(plain):
        raise CircuitSAEError(f"a site is named twice in {[str(s) for s in plain]}")
    return sorted(set(found), key=Site.sort_key)


def select(names: "Iterable[str | Site]", available: "Iterable[str]", where: str) -> list[str]:
    """Sites and site patterns matched against the sites ``where`` holds (an activation store, say).

    A plain site ``where`` lacks, or a pattern matching none of its sites, is one :class:`CircuitSAEError` line.
    """
    have = list(available)
    have_sites = {Site.parse(s) for s in have}
    n = max((s.layer for s in have_sites), default=-1) + 1
    chosen: list[str] = []
    for name in names:
        check_pattern(name)
        if not is_pattern(name):
            if str(Site.parse(name)) not in have:
                raise CircuitSAEError(f"site {name} is not in {where} (it has {', '.join(have)})")
            chosen.append(str(Site.parse(name)))
            continue
        text = str(name).strip()
        kind, spec = ("*", "*") if text == "all" else text.split(".", 1)
        try:
            wanted = expand([f"{k}.{spec}" for k in (KINDS if kind == "*" else (kind,))], max(n, _max_layer(spec) + 1))
        except CircuitSAEError:
            wanted = []
        matched = [str(s) for s in wanted if s in have_sites]
        if not matched:
            raise CircuitSAEError(f"site pattern {text!r} matches none of the sites of {where} ({', '.join(have)})")
        chosen.extend(matched)
    return sorted(dict.fromkeys(chosen), key=lambda s: Site.parse(s).sort_key())


def _max_layer(spec: str) -> int:
    return max((int(x) for x in re.findall(r"\d+", spec)), default=0)


def resolve(model: Any, names: "Iterable[str | Site]") -> list[Site]:
    """Parse and validate site names and patterns (:func:`expand`) for ``model``; return them in forward order.

    Raises :class:`CircuitSAEError` naming the valid sites if one is unknown or
    out of range, if a pattern matches nothing, or if the list is empty or repeats a site.
    """
    names = list(names)
    if not names:
        raise CircuitSAEError("no site given: name at least one, e.g. resid.3")
    layout(model)  # unsupported architectures fail here, with the list
    return expand(names, n_layers(model))


def path(model: Any, site: "str | Site") -> str:
    """The dotted name of the module whose output is ``site``, e.g. ``model.layers.3.mlp``."""
    site = Site.parse(site)
    lay = layout(model)
    block = f"{lay.blocks}.{site.layer}"
    return block if site.kind == "resid" else f"{block}.{lay.attn if site.kind == 'attn' else lay.mlp}"


def module(model: Any, site: "str | Site") -> Any:
    """The module (an nnsight Envoy when ``model`` is wrapped) whose output is ``site``."""
    obj = model
    for part in path(model, site).split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def read(model: Any, site: "str | Site") -> Any:
    """Inside an nnsight trace: the activation tensor ``[batch, seq, d]`` at ``site``.

    Attention modules return ``(output, weights)``; this returns the output.
    """
    out = module(model, site).output
    return out[0] if isinstance(out, tuple) else out


def parse_target(text: str) -> tuple[str, int]:
    """``"resid.4:123"`` -> ``("resid.4", 123)``."""
    m = re.fullmatch(r"\s*([a-z]+\.\d+):(\d+)\s*", str(text))
    if not m:
        raise CircuitSAEError(f"{text!r} is not SITE:FEATURE, e.g. resid.4:123")
    return str(Site.parse(m.group(1))), int(m.group(2))


# -- other libraries' names for sites --------------------------------------------------------------------
# Hook names map to circuitsae sites only where they name the same tensor (``resid.L`` is block L's output,
# ``mlp.L``/``attn.L`` what its MLP/attention adds to the residual); the dictionary readers
# (:mod:`circuitsae.dictionaries.formats`) use them::
#
#     blocks.L.hook_resid_post                       -> resid.L     SAE Lens (TransformerLens names)
#     blocks.L.hook_resid_pre, L >= 1                -> resid.(L-1) the same tensor (L = 0 is the embeddings)
#     blocks.L.hook_mlp_out, blocks.L.hook_attn_out  -> mlp.L, attn.L  (after Gemma's post-norms, as circuitsae)
#     model.layers.L, transformer.h.L,               -> resid.L     HF module paths (SAE Lens on an HF model);
#       gpt_neox.layers.L; layers.L, h.L                            sparsify's, relative to base_model
#     <blocks>.L.mlp / .self_attn / .attn /          -> mlp.L, attn.L  only when the model name tells a family
#       .attention / .post_feedforward_layernorm /                  in which that module is the site (Gemma's
#       .post_attention_layernorm                                   mlp is not mlp.L; its post-norm is)
#     d_l submodule_name resid_{out,post}_layer{_}L  -> resid.L     with buffer io "out" and a matching layer;
#       mlp_out_layerL, attn_out_layerL              -> mlp.L, attn.L  for a named non-Gemma model only
#
# Everything else (``hook_resid_mid``, ``hook_z``, ``mlp.hook_post``, a head index, the embeddings) maps to None.

_TL_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_mlp_out|hook_attn_out)$")
_TL_KIND = {"hook_resid_post": "resid", "hook_mlp_out": "mlp", "hook_attn_out": "attn"}
_SITE_TO_TL = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
#: substrings of a model name -> the circuitsae families (:data:`ARCHITECTURES` keys) it can be
_FAMILY_HINTS = (
    ("gemma-3", ("gemma3_text",)),
    ("gemma3", ("gemma3_text",)),
    ("gemma-2", ("gemma2",)),
    ("gemma2", ("gemma2",)),
    ("gemma", ("gemma2", "gemma3_text")),
    ("gpt2", ("gpt2",)),
    ("gpt-2", ("gpt2",)),
    ("pythia", ("gpt_neox",)),
    ("neox", ("gpt_neox",)),
    ("qwen", ("qwen2",)),
    ("mistral", ("mistral",)),
    ("llama", ("llama",)),
    ("smollm", ("llama",)),
)


def _families(model: "str | None") -> "tuple[str, ...] | None":
    """The families a model name says (None: unknown, any)."""
    name = (model or "").lower()
    for key, fams in _FAMILY_HINTS:
        if key in name:
            return fams
    return None


def transformer_lens_site(hook: str) -> "str | None":
    """The circuitsae site a TransformerLens hook name is, or None (table in the section above)."""
    m = _TL_HOOK.match(hook or "")
    if not m:
        return None
    layer, name = int(m.group(1)), m.group(2)
    if name == "hook_resid_pre":  # block L's input is block L−1's output; L = 0 reads the embeddings
        return f"resid.{layer - 1}" if layer >= 1 else None
    return f"{_TL_KIND[name]}.{layer}"


def module_site(name: str, model: "str | None" = None, relative: bool = False) -> "str | None":
    """The site a Hugging Face module path is (``relative``: to ``base_model``, as sparsify names them).

    A block's output is ``resid.L`` in every family; a sub-module is ``mlp.L``/``attn.L`` only if every
    family the model name allows says so (Gemma's ``mlp`` is not ``mlp.L``, Llama's
    ``post_attention_layernorm`` is not ``attn.L``).
    """
    fams = _families(model) or tuple(ARCHITECTURES)
    found: set = set()
    for fam in fams:
        lay = ARCHITECTURES[fam]
        blocks = lay.blocks.split(".", 1)[1] if relative else lay.blocks
        m = re.fullmatch(re.escape(blocks) + r"\.(\d+)(?:\.(\w+))?", name or "")
        if not m:
            continue
        layer, attr = int(m.group(1)), m.group(2)
        kind = "resid" if attr is None else "attn" if attr == lay.attn else "mlp" if attr == lay.mlp else None
        found.add(f"{kind}.{layer}" if kind else None)
    return found.pop() if len(found) == 1 else None


_DL_SUBMODULE = re.compile(r"^(resid|mlp|attn)_(?:out|post)_layer_?(\d+)$")


def dictionary_learning_site(submodule: "str | None", model: "str | None", layer: Any, io: Any) -> "str | None":
    """The site a dictionary_learning ``submodule_name`` names (table in the section above)."""
    m = _DL_SUBMODULE.match(submodule or "")
    if not m or io not in (None, "out"):
        return None
    kind, n = m.group(1), int(m.group(2))
    if layer is not None and layer != n:
        return None
    if kind != "resid":
        fams = _families(model)
        if fams is None or any(f.startswith("gemma") for f in fams):
            return None
    return f"{kind}.{n}"


def site_to_hook(site: str) -> str:
    """The TransformerLens hook name of a circuitsae site (what SAE Lens's ``hook_name`` holds)."""
    s = Site.parse(site)
    return f"blocks.{s.layer}.{_SITE_TO_TL[s.kind]}"
