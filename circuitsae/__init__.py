"""circuitsae: sparse autoencoders and feature circuits on real language models.

The public API::

    load_model(name)            an nnsight-wrapped causal LM (default: SmolLM2-135M)
    Site / resolve_sites        where activations live: resid.L, mlp.L, attn.L
    load_corpus / contexts      real text, tokenised into fixed-length contexts
    harvest(...)                record site activations into an on-disk store
    ActivationStore(path)       read a store: shuffled batches, held-out slice, tokens
"""

from circuitsae.data import contexts, load_corpus
from circuitsae.errors import CircuitSAEError
from circuitsae.harvest import HarvestConfig, harvest
from circuitsae.models import load_model
from circuitsae.sites import Site
from circuitsae.sites import resolve as resolve_sites
from circuitsae.store import ActivationStore

__version__ = "0.1.0"

__all__ = [
    "ActivationStore",
    "CircuitSAEError",
    "HarvestConfig",
    "Site",
    "contexts",
    "harvest",
    "load_corpus",
    "load_model",
    "resolve_sites",
]
