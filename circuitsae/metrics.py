"""Dictionary quality metrics (REFERENCE §3) as pure functions of tensors.

Each takes activations ``x`` ``[n, d]``, reconstructions ``x_hat`` ``[n, d]``
or codes ``[n, d_dict]`` and returns a float or tensor; nothing is stored
between calls. :class:`ReconstructionStats` accumulates the same sums chunk
by chunk, for evaluation sets that do not fit in memory, and gives identical
numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DENSE_THRESHOLD = 0.1  # a feature active on more than 10% of tokens is "dense"


def l0(codes: torch.Tensor) -> float:
    """Mean number of non-zero codes per row."""
    return float((codes != 0).sum(-1).double().mean())


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: Σ||x − x̂||² / Σ||x − mean(x)||², mean per dimension."""
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 − FVU."""
    return 1.0 - fvu(x, x_hat)


def relative_reconstruction_bias(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """γ = argmin_γ E||x̂/γ − x||² = E||x̂||² / E[x·x̂]; γ < 1 means the SAE shrinks."""
    x, x_hat = x.double(), x_hat.double()
    return float(x_hat.pow(2).sum() / (x * x_hat).sum())


def feature_density(codes: torch.Tensor) -> torch.Tensor:
    """Fraction of rows on which each feature is non-zero, ``[d_dict]``."""
    return (codes != 0).float().mean(0)


def dead_fraction(density: torch.Tensor) -> float:
    """Fraction of features never active (density exactly 0)."""
    return float((density == 0).float().mean())


def dense_fraction(density: torch.Tensor, threshold: float = DENSE_THRESHOLD) -> float:
    """Fraction of features active on more than ``threshold`` of rows."""
    return float((density > threshold).float().mean())


def density_histogram(density: torch.Tensor, bins: int = 40, low: float = -8.0) -> dict:
    """Histogram of log10 feature density over ``[low, 0]``; dead features counted apart."""
    alive = density[density > 0]
    counts = torch.histc(alive.log10().clamp(low, 0.0), bins=bins, min=low, max=0.0)
    edges = torch.linspace(low, 0.0, bins + 1, device="cpu")
    return {"log10_edges": edges.tolist(), "counts": counts.long().tolist(), "dead": int((density == 0).sum())}


def cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Per-context mean next-token cross-entropy ``[batch]``, predicting tokens after position ``first``.

    Accumulated in float32 (at least) whatever the logits' dtype, on the logits' device.
    """
    logp = wide(logits[:, first:-1]).log_softmax(-1)
    targets = input_ids[:, first + 1 :].to(logp.device)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean(-1)


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32 (float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """D_KL(p ‖ q) over the last dimension, from logits (any leading shape)."""
    logp, logq = wide(p_logits).log_softmax(-1), wide(q_logits).log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """(CE_zero − CE_spliced) / (CE_zero − CE_clean): 1 = as the model, 0 = as zero-ablation."""
    return (ce_zero - ce_spliced) / (ce_zero - ce_clean)


@dataclass
class ReconstructionStats:
    """Running sums for L0, FVU, γ and feature density over many chunks (float64)."""

    n: int = 0
    sq_err: float = 0.0
    x_hat_sq: float = 0.0
    x_dot: float = 0.0
    nonzero: float = 0.0
    sum_x: "torch.Tensor | None" = None
    sum_x2: "torch.Tensor | None" = None
    fired: "torch.Tensor | None" = field(default=None)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        active = codes != 0
        self.n += x.shape[0]
        self.sq_err += float((x - x_hat).pow(2).sum())
        self.x_hat_sq += float(x_hat.pow(2).sum())
        self.x_dot += float((x * x_hat).sum())
        self.nonzero += float(active.sum())
        sx, sx2, f = x.sum(0).cpu(), x.pow(2).sum(0).cpu(), active.sum(0).double().cpu()
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx
        self.sum_x2 = sx2 if self.sum_x2 is None else self.sum_x2 + sx2
        self.fired = f if self.fired is None else self.fired + f

    def summary(self) -> dict:
        assert self.sum_x is not None and self.sum_x2 is not None and self.fired is not None, "no data"
        variance = float((self.sum_x2 - self.sum_x.pow(2) / self.n).sum())
        density = (self.fired / self.n).float()
        return {
            "tokens": self.n,
            "l0": self.nonzero / self.n,
            "fvu": self.sq_err / variance,
            "explained_variance": 1 - self.sq_err / variance,
            "mse": self.sq_err / self.n,
            "gamma": self.x_hat_sq / self.x_dot if self.x_dot else float("nan"),
            "dead_fraction": dead_fraction(density),
            "dense_fraction": dense_fraction(density),
            "density_histogram": density_histogram(density),
        }
