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
    evaluate(...)               L0, FVU, γ, dead/dense, loss recovered
    run_spliced(model, ids, {site: dictionary})   logits with reconstructions spliced in
    make_ioi / ioi_performance  IOI prompts with counterfactual targets; the model's logit diff
    patch_features(...)         patch chosen features of the target run into the base run: KL, edit size
    acdc(...)                   order features by ACDC (or attribution): KL vs features / edit curves
    run_ioi(...)                the whole IOI experiment for many dictionaries + PCA, JSON and PNG
    analyse_feature(...)        one feature: top/random contexts, token histogram, logit effect, unembedding
    causal_tree(model, {site: dictionary}, (site, feature))   ablation tree of a feature: a networkx DiGraph
    render_tree(graph, stem)    draw it: stem.dot, .svg, .png (graphviz) and node-link .json
    find_token_feature(...)     the feature that best picks out a token such as " the" or ")"
    run_demo(...)               everything above end to end, with summary.json and report.html
"""

from circuitsae.acdc import acdc, acdc_reference
from circuitsae.data import contexts, load_corpus
from circuitsae.demo import DemoConfig, run_demo
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
from circuitsae.errors import CircuitSAEError
from circuitsae.evaluate import evaluate
from circuitsae.features import FeatureReport, analyse_feature, find_token_feature
from circuitsae.harvest import HarvestConfig, harvest
from circuitsae.ioi_curves import IOIConfig, run_ioi
from circuitsae.models import load_model
from circuitsae.patching import PatchResult, patch_features
from circuitsae.render import render as render_tree
from circuitsae.sites import Site
from circuitsae.sites import resolve as resolve_sites
from circuitsae.splice import run_ablated, run_spliced, splice_sites
from circuitsae.store import ActivationStore
from circuitsae.tasks import ioi_performance, make_ioi
from circuitsae.train import TrainConfig, train
from circuitsae.trees import causal_tree

__version__ = "0.1.0"

__all__ = [
    "ActivationStore",
    "BatchTopKSAE",
    "CircuitSAEError",
    "Dictionary",
    "FeatureReport",
    "GatedSAE",
    "HarvestConfig",
    "IOIConfig",
    "PatchResult",
    "IdentityDictionary",
    "JumpReLUSAE",
    "PCADictionary",
    "ReluSAE",
    "Site",
    "TopKSAE",
    "TrainConfig",
    "acdc",
    "acdc_reference",
    "analyse_feature",
    "DemoConfig",
    "run_demo",
    "find_token_feature",
    "causal_tree",
    "contexts",
    "evaluate",
    "harvest",
    "load_corpus",
    "load_dictionary",
    "ioi_performance",
    "load_model",
    "make_ioi",
    "patch_features",
    "render_tree",
    "resolve_sites",
    "run_ablated",
    "run_ioi",
    "run_spliced",
    "splice_sites",
    "train",
]
