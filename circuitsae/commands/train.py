"""``circuitsae train``: train many SAEs in one pass over a store (checkpointed and resumable)."""

from __future__ import annotations

from typing import Any, NamedTuple

from circuitsae import distributed
from circuitsae.dictionaries import Dictionary
from circuitsae.training.trainer import TrainConfig, train

NAME = "train"
HELP = "train SAEs (relu, gated, topk, batchtopk, jumprelu) on a store or from the model, many in one pass"
DESCRIPTION = (
    "Train every (site, architecture, coefficient) combination in one pass over the store, or (--model) over the "
    "model's forward passes; checkpointed and resumable."
)
EXAMPLES = (
    "examples:\n  circuitsae train --store runs/acts --arch relu gated --out runs/saes\n"
    "  circuitsae train --store runs/acts --sites resid.4 --arch gated --coefficients 1 2 4 8 --expansion 4\n"
    "  circuitsae train --model smollm2-135m --sites all --tokens 500k --arch topk --expansion 2 --eval-rows 16384 --out runs/all"
)
Config = TrainConfig


class Trained(NamedTuple):
    """The saved dictionaries by run name, and the configuration that trained them."""

    saved: dict[str, Dictionary]
    config: TrainConfig


def run(cfg: TrainConfig, *, model: Any = None, progress: bool = True) -> Trained:
    """The command's work: :func:`circuitsae.training.trainer.train` (from a store no model is loaded; with
    ``cfg.model`` the given ``model``, if any, is the one streamed)."""
    return Trained(train(cfg, progress=progress, model=model if cfg.streams else None), cfg)


def show(result: Trained) -> str:
    """What ``circuitsae train`` prints."""
    saved, cfg = result
    world = distributed.current()
    if world.active and not saved and not world.main and cfg.parallel == "data":
        return ""  # rank 0 saves and reports
    if not saved:
        return f"stopped after {cfg.stop_after} steps; re-run the same command to continue"
    lines = []
    for name, sae in saved.items():
        m = sae.meta["metrics"]
        if not m:  # a store without held-out rows (harvest --heldout-tokens 0)
            lines.append(f"{name}: no held-out rows in the store, so no held-out metrics -> {cfg.out}/{name}")
            continue
        lines.append(f"{name}: L0 {m['l0']:.1f}, FVU {m['fvu']:.3f}, gamma {m['gamma']:.3f} -> {cfg.out}/{name}")
    lines.append(f"next: circuitsae eval {cfg.out}")
    return "\n".join(lines)
