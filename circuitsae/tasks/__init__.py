"""Tasks with known circuits, as datasets of tokenised prompts with their metrics (IOI: Wang et al. 2022)."""

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

__all__ = [
    "NAMES",
    "OBJECTS",
    "PLACES",
    "TEMPLATES",
    "IOIDataset",
    "final_logits",
    "ioi_performance",
    "logit_diff",
    "make_ioi",
    "single_token_names",
]
