"""Tasks with known circuits, as datasets of tokenised prompts with their metrics (IOI: Wang et al. 2022).

:class:`PromptPairs` (base prompts and their counterfactual targets) is what patching and ACDC read; a task's
dataset extends it.
"""

from circuitsae.tasks.ioi import (
    NAMES,
    OBJECTS,
    PLACES,
    TEMPLATES,
    IOIDataset,
    final_logits,
    ioi_performance,
    logit_diff,
    make_ioi,
    single_token_names,
)
from circuitsae.tasks.pairs import PromptPairs

__all__ = [
    "NAMES",
    "OBJECTS",
    "PLACES",
    "TEMPLATES",
    "PromptPairs",
    "IOIDataset",
    "final_logits",
    "ioi_performance",
    "logit_diff",
    "make_ioi",
    "single_token_names",
]
