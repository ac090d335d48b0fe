"""``circuitsae harvest``: record site activations over a corpus into a store (resumable)."""

from __future__ import annotations

from typing import Any

from circuitsae import distributed
from circuitsae.data.harvest import HarvestConfig, harvest
from circuitsae.data.store import ActivationStore

NAME = "harvest"
HELP = "record site activations over a corpus into a store"
DESCRIPTION = "Run the model through nnsight over a corpus and store the activations of one or more sites (resumable)."
EXAMPLES = (
    "examples:\n  circuitsae harvest --sites resid.3 resid.4 --tokens 200000 --out runs/acts\n"
    "  circuitsae harvest --model tiny-llama --corpus my_texts/ --tokens 5000 --out /tmp/acts"
)
Config = HarvestConfig


def run(cfg: HarvestConfig, *, model: Any = None, progress: bool = True) -> ActivationStore:
    """The command's work: :func:`circuitsae.data.harvest.harvest`."""
    return harvest(cfg, model=model, progress=progress)


def show(store: ActivationStore) -> str:
    """What ``circuitsae harvest`` prints (on the main process only)."""
    return str(store) if distributed.current().main else ""
