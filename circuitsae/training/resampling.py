"""Dead-feature resampling (Bricken et al. 2023, "Towards Monosemanticity").

Relu and gated runs only — TopK and BatchTopK revive dead latents with their auxiliary loss, JumpReLU trains
without. Every ``resample_every`` steps (default: every quarter of training, skipped when a quarter is under 50
steps; until 80% of training, see :mod:`~circuitsae.training.schedule`), features that have not fired in that
window are re-initialised: the decoder row becomes a training input from the current batch, drawn with
probability ∝ the *square* of its loss ||x − x̂||² (Bricken et al.: "proportional to the square of the
autoencoder loss", i.e. ∝ ||x − x̂||⁴), minus b_dec, normalised; the encoder (gate) row becomes that direction
× 0.2 × the mean norm of live encoder rows; their biases are zeroed and the Adam moments of all those rows reset.

Data-parallel, the whole batch and its losses are gathered on every rank; rank 0 draws the rows and broadcasts
them. Each run draws from a generator of its own, so a run resamples the same alone, among others or on another
rank.
"""

from __future__ import annotations

from typing import Any

import torch

from circuitsae import distributed
from circuitsae.training.runs import Run


@torch.no_grad()
def resample_dead(
    run: Run,
    x: torch.Tensor,
    loss: Any,
    step_count: int,
    dead_window: int,
    world: distributed.World,
    data_parallel: bool,
) -> int:
    """Re-initialise ``run``'s features not fired for ``dead_window`` steps from rows of ``x``; return how many."""
    dead = (run.last_fired <= step_count - dead_window).nonzero().squeeze(1)
    if dead.numel() == 0:  # the same on every rank: which features fired is combined every step
        return 0
    x = x.float()
    err = (loss.x_hat.float() - x).pow(2).sum(-1)
    if data_parallel:  # the whole batch on every rank; rank 0 draws, every rank takes its rows
        x, err = distributed.all_gather_cat(x), distributed.all_gather_cat(err)
    err = err.cpu().double()
    weights = err.pow(2) if float(err.sum()) > 0 else torch.ones_like(err)
    if world.main or not data_parallel:
        rows = torch.multinomial(weights, dead.numel(), replacement=True, generator=run.generator)
    else:
        rows = torch.empty(dead.numel(), dtype=torch.long, device="cpu")
    rows = rows.to(x.device)
    if data_parallel:
        distributed.broadcast_(rows, f"resampling at step {step_count}")
    touched = run.sae.resample(dead, x[rows])
    for p, idx in touched:
        state = run.optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][idx] = 0.0
    run.last_fired[dead] = step_count
    return int(dead.numel())
