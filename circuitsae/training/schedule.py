"""The training schedule: pure functions of the step, the length of training and the config's numbers.

- warm-up: the learning rate ramps up linearly over ``lr_warmup_steps``, the sparsity coefficient over
  ``coef_warmup_steps`` (:func:`warmup_factor` of the 0-based step);
- dead-feature resampling: features that have not fired for ``dead_window`` steps are resampled every
  ``resample_every`` steps until 80% of training (:func:`resamples_at`);
- TopK's auxiliary loss sees latents that have not fired for ``aux_dead_steps`` steps.
"""

from __future__ import annotations

import math

#: TopK's auxiliary loss: a latent is dead when it has not fired for this many tokens (Gao et al.: 10M) or a
#: tenth of training, whichever is shorter
AUX_DEAD_TOKENS = 10_000_000
MIN_RESAMPLE_WINDOW = 50  # steps; the default schedule does not resample over shorter windows


def warmup_steps(fraction: float, total_steps: int) -> int:
    """Steps of a linear warm-up over ``fraction`` of training (at least one)."""
    return max(1, round(fraction * total_steps))


def warmup_factor(step: int, warmup: int) -> float:
    """The factor of the lr or coefficient at 0-based ``step``: min(1, (step + 1) / warmup)."""
    return min(1.0, (step + 1) / warmup)


def dead_window(resample_every: int, total_steps: int) -> int:
    """Dead = not fired for this many steps: ``resample_every`` if set (> 0), else a quarter of training."""
    return resample_every if resample_every > 0 else max(1, total_steps // 4)


def resample_period(resample_every: int, window: int) -> int | None:
    """Steps between resamplings, or None for never.

    The default schedule (``resample_every`` 0) resamples every ``window`` steps (a quarter of training), but only
    when a quarter is at least MIN_RESAMPLE_WINDOW steps: over a shorter window "dead" means little, and early
    resampled features (b_dec not yet learned) all point along the data mean, fire on every input and blow up the
    reconstruction. ``resample_every`` < 0: never.
    """
    if resample_every < 0 or (resample_every == 0 and window < MIN_RESAMPLE_WINDOW):
        return None
    return window


def resamples_at(step_count: int, period: int | None, total_steps: int) -> bool:
    """Whether dead features are resampled after ``step_count`` steps: every ``period`` steps, until 80%."""
    return bool(period) and step_count % period == 0 and step_count < 0.8 * total_steps


def aux_dead_steps(batch_size: int, total_steps: int) -> int:
    """TopK's auxiliary loss sees latents not fired for AUX_DEAD_TOKENS tokens or a tenth of training."""
    return max(1, min(math.ceil(AUX_DEAD_TOKENS / batch_size), total_steps // 10))
