"""circuitsae: sparse autoencoders and feature circuits on real language models.

The public API::

    load_model(name)            an nnsight-wrapped causal LM (default: SmolLM2-135M)
    Site / resolve_sites        where activations live: resid.L, mlp.L, attn.L
    load_corpus / contexts      real text, tokenised into fixed-length contexts
    harvest(...)                record site activations into an on-disk store
    ActivationStore(path)       read a store: shuffled batches, held-out slice, tokens
    ReluSAE, GatedSAE, TopKSAE, the dictionary interface: encode(x) -> codes,
    BatchTopKSAE, JumpReLUSAE,  decode(codes) -> x̂, directions [d_dict, d],
    PCADictionary,              save(path) / load_dictionary(path)
    IdentityDictionary
    train(...)                  train many SAEs in one pass over a store (resumable)
    evaluate(...)               L0, FVU, γ, dead/dense, loss recovered: an Evaluation of DictionaryMetrics
    run_spliced(model, ids, {site: dictionary})   logits with reconstructions spliced in
    make_ioi / ioi_performance  IOI prompts (PromptPairs) with counterfactual targets; the model's logit diff
    patch_features(...)         patch chosen features of the target run into the base run: KL, edit size
    acdc(...)                   order features by ACDC (or attribution): KL vs features / edit curves
    run_ioi(...)                the whole IOI experiment for many dictionaries + PCA: an IOIRun, JSON and PNG
    analyse_feature(...)        one feature: top/random contexts, token histogram, logit effect, unembedding
    causal_tree(model, {site: dictionary}, (site, feature))   ablation tree of a feature: a CausalTree
    render_tree(tree, stem)     draw it: stem.dot, .svg, .png (graphviz) and node-link .json
    find_token_feature(...)     the feature that best picks out a token such as " the" or ")"
    run_demo(...)               everything above end to end, with summary.json and report.html

Each name is imported from its wing (``circuitsae.data``, ``.dictionaries``, ``.training``,
``.interventions``, ``.circuits``, ``.viz``, ``.commands``) when first used, so ``import circuitsae`` is fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from circuitsae.errors import CircuitSAEError

__version__ = "0.1.0"

#: public name -> the module it lives in (or (module, name there) where the names differ)
_PUBLIC: dict[str, "str | tuple[str, str]"] = {
    "acdc": "circuitsae.circuits.acdc",
    "acdc_reference": "circuitsae.circuits.acdc",
    "ActivationStore": "circuitsae.data.store",
    "analyse_feature": "circuitsae.circuits.features",
    "BatchTopKSAE": "circuitsae.dictionaries",
    "causal_tree": "circuitsae.circuits.trees",
    "CausalTree": "circuitsae.circuits.trees",
    "contexts": "circuitsae.data.corpora",
    "DemoConfig": "circuitsae.commands.demo",
    "Dictionary": "circuitsae.dictionaries",
    "DictionaryMetrics": "circuitsae.training.evaluate",
    "evaluate": "circuitsae.training.evaluate",
    "Evaluation": "circuitsae.training.evaluate",
    "FeatureReport": "circuitsae.circuits.features",
    "find_token_feature": "circuitsae.circuits.features",
    "GatedSAE": "circuitsae.dictionaries",
    "harvest": "circuitsae.data.harvest",
    "HarvestConfig": "circuitsae.data.harvest",
    "IdentityDictionary": "circuitsae.dictionaries",
    "ioi_performance": "circuitsae.tasks",
    "IOIConfig": "circuitsae.commands.ioi",
    "IOIRun": "circuitsae.commands.ioi",
    "JumpReLUSAE": "circuitsae.dictionaries",
    "load_corpus": "circuitsae.data.corpora",
    "load_dictionary": "circuitsae.dictionaries",
    "load_model": "circuitsae.models",
    "make_ioi": "circuitsae.tasks",
    "patch_features": "circuitsae.interventions.patching",
    "PatchResult": "circuitsae.interventions.patching",
    "PCADictionary": "circuitsae.dictionaries",
    "PromptPairs": "circuitsae.tasks.pairs",
    "ReluSAE": "circuitsae.dictionaries",
    "render_tree": ("circuitsae.viz.render", "render"),
    "resolve_sites": ("circuitsae.sites", "resolve"),
    "run_ablated": "circuitsae.interventions.splice",
    "run_demo": "circuitsae.commands.demo",
    "run_ioi": "circuitsae.commands.ioi",
    "run_spliced": "circuitsae.interventions.splice",
    "Site": "circuitsae.sites",
    "splice_sites": "circuitsae.interventions.splice",
    "TopKSAE": "circuitsae.dictionaries",
    "train": "circuitsae.training.trainer",
    "TrainConfig": "circuitsae.training.trainer",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its wing on first use (PEP 562)."""
    where = _PUBLIC.get(name)
    if where is None:
        raise AttributeError(f"module 'circuitsae' has no attribute {name!r}")
    module, attr = (where, name) if isinstance(where, str) else where
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


if TYPE_CHECKING:  # what static tools and IDEs see
    from circuitsae.circuits.acdc import acdc, acdc_reference
    from circuitsae.circuits.features import FeatureReport, analyse_feature, find_token_feature
    from circuitsae.circuits.trees import CausalTree, causal_tree
    from circuitsae.commands.demo import DemoConfig, run_demo
    from circuitsae.commands.ioi import IOIConfig, IOIRun, run_ioi
    from circuitsae.data.corpora import contexts, load_corpus
    from circuitsae.data.harvest import HarvestConfig, harvest
    from circuitsae.data.store import ActivationStore
    from circuitsae.dictionaries import (
        BatchTopKSAE,
        Dictionary,
        GatedSAE,
        IdentityDictionary,
        JumpReLUSAE,
        PCADictionary,
        ReluSAE,
        TopKSAE,
        load_dictionary,
    )
    from circuitsae.interventions.patching import PatchResult, patch_features
    from circuitsae.interventions.splice import run_ablated, run_spliced, splice_sites
    from circuitsae.models import load_model
    from circuitsae.sites import Site
    from circuitsae.sites import resolve as resolve_sites
    from circuitsae.tasks import ioi_performance, make_ioi
    from circuitsae.tasks.pairs import PromptPairs
    from circuitsae.training.evaluate import DictionaryMetrics, Evaluation, evaluate
    from circuitsae.training.trainer import TrainConfig, train
    from circuitsae.viz.render import render as render_tree

__all__ = [
    "acdc",
    "acdc_reference",
    "ActivationStore",
    "analyse_feature",
    "BatchTopKSAE",
    "causal_tree",
    "CausalTree",
    "CircuitSAEError",
    "contexts",
    "DemoConfig",
    "Dictionary",
    "DictionaryMetrics",
    "evaluate",
    "Evaluation",
    "FeatureReport",
    "find_token_feature",
    "GatedSAE",
    "harvest",
    "HarvestConfig",
    "IdentityDictionary",
    "ioi_performance",
    "IOIConfig",
    "IOIRun",
    "JumpReLUSAE",
    "load_corpus",
    "load_dictionary",
    "load_model",
    "make_ioi",
    "patch_features",
    "PatchResult",
    "PCADictionary",
    "PromptPairs",
    "ReluSAE",
    "render_tree",
    "resolve_sites",
    "run_ablated",
    "run_demo",
    "run_ioi",
    "run_spliced",
    "Site",
    "splice_sites",
    "TopKSAE",
    "train",
    "TrainConfig",
]
