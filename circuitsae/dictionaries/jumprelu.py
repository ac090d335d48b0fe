"""The JumpReLU sparse autoencoder (Rajamanoharan et al. 2024b, "Jumping ahead"; REFERENCE §2b)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch
from torch import nn

from circuitsae.dictionaries import fused
from circuitsae.dictionaries.base import Loss, TrainingDefaults
from circuitsae.dictionaries.encoder import AffineEncoderSAE
from circuitsae.dictionaries.writers import SAELensForm
from circuitsae.errors import CircuitSAEError

if TYPE_CHECKING:
    from circuitsae.dictionaries.formats.core import Parts

#: ε and the initial θ in units of √d: the paper's 1e-3 for activations scaled to E||x||² = 1 becomes
#: 1e-3·√d under this library's E||x||² = d (pre-activations grow with ||x||)
BANDWIDTH_PER_SQRT_D = 1e-3
INITIAL_THRESHOLD_PER_SQRT_D = 1e-3
#: the learning rate of t = log θ, as a multiple of the run's: Adam moves t by about lr per step, so at the
#: paper's rates θ would change by a few per cent over a training of this library's length (a choice)
THRESHOLD_LR_SCALE = 100.0


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    """K(u) = 1[|u| ≤ 1/2]."""
    return (u.abs() <= 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre · H(pre − θ); ∂/∂pre = H(pre − θ), ∂/∂θ = −(θ/ε) K((pre − θ)/ε) (straight-through)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        d_pre = g * (pre > theta).to(g.dtype)
        d_theta = -(theta / eps) * _rectangle((pre - theta) / eps) * g
        return d_pre, d_theta.sum_to_size(theta.shape), None


class _Step(torch.autograd.Function):
    """H(pre − θ); ∂/∂pre = 0, ∂/∂θ = −(1/ε) K((pre − θ)/ε) (straight-through)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        d_theta = -(1.0 / eps) * _rectangle((pre - theta) / eps) * g
        return None, d_theta.sum_to_size(theta.shape), None


class JumpReLUSAE(AffineEncoderSAE):
    r"""JumpReLU SAE: a ReLU that jumps, with a learned threshold per feature and an L0 penalty.

    ::

        pre = W_enc (x − b_dec) + b_enc
        f_i = pre_i · H(pre_i − θ_i),   θ_i = exp(t_i) > 0    (t = ``log_threshold``)
        L   = ||x − x̂||² + λ Σ_i H(pre_i − θ_i)

    H has zero gradient almost everywhere, so training uses the paper's straight-through
    pseudo-derivatives with the rectangle kernel and bandwidth ε (``bandwidth``; default 1e-3·√d, the
    paper's 1e-3 carried to this library's E||x||² = d scaling). t learns ``THRESHOLD_LR_SCALE`` = 100
    times faster than the weights (:meth:`param_groups`). ``Loss.total`` is L (no auxiliary term). θ starts at 1e-3·√d, W_enc at
    W_dec·min(1, 2d/d_sae) (as the untied ReLU SAE's). The paper leaves decoder norms free; here
    its rows are held at unit norm like every dictionary's (the L0 penalty does not see their scale).
    ``t = −inf`` (θ = 0) is allowed: a Gated SAE exported as a JumpReLU may have it.
    """

    architecture: ClassVar[str] = "jumprelu"
    #: Rajamanoharan et al. 2024b's Adam; the coefficient is λ of the L0 penalty
    training: ClassVar[TrainingDefaults] = TrainingDefaults(lr=3e-4, betas=(0.0, 0.999), coefficient=0.3)
    reads: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "saelens": ("jumprelu",),
        "dictionary_learning": ("JumpReluAutoEncoder",),
    }
    saelens_writes: ClassVar[tuple[str, ...]] = ("jumprelu",)
    minus_infinity_allowed: ClassVar[tuple[str, ...]] = ("log_threshold",)

    def __init__(self, d: int, d_dict: int, bandwidth: "float | None" = None) -> None:
        if bandwidth is not None and not (math.isfinite(bandwidth) and bandwidth > 0):
            raise CircuitSAEError(f"jumprelu: bandwidth must be a finite number > 0, got {bandwidth}")
        super().__init__(d, d_dict, encoder_scale=min(1.0, 2 * d / d_dict))
        self.bandwidth = float(bandwidth) if bandwidth is not None else BANDWIDTH_PER_SQRT_D * math.sqrt(d)
        self.log_threshold = nn.Parameter(torch.full((d_dict,), math.log(INITIAL_THRESHOLD_PER_SQRT_D * math.sqrt(d))))

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups: t = log θ learns ``THRESHOLD_LR_SCALE`` times faster than the weights."""
        rest = [p for n, p in self.named_parameters() if n != "log_threshold"]
        return [{"params": rest}, {"params": [self.log_threshold], "lr_scale": THRESHOLD_LR_SCALE}]

    @property
    def threshold(self) -> torch.Tensor:
        """θ = exp(t), ``[d_sae]``."""
        return self.log_threshold.exp()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activation(x)
        return torch.where(pre > self.threshold, pre, 0.0)

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activation_features(x, features)
        return torch.where(pre > self.threshold[features], pre, 0.0)

    def loss(self, x: torch.Tensor, coefficient: float, mode: str = "auto") -> Loss:
        """L = ||x − x̂||² + λ·L0 (batch means of row sums), straight-through gradients for θ.

        The sparse path (fused.py; ``mode`` "auto" below ``fused.SPARSE_BELOW`` open, or "sparse") works on
        the units that are open or inside the kernel's band ((pre − θ)/ε ≥ −1/2): every other unit has zero codes
        and zero pseudo-derivatives, so it gives the same loss and gradients as the dense one.
        """
        pre = self.pre_activation(x)
        theta = self.threshold
        with torch.no_grad():
            density = fused.open_fraction(pre[: fused.PROBE_ROWS] > theta)
        if not fused.use_sparse(x, mode, density):
            return self._loss_dense(x, pre, theta, coefficient)
        pre = pre.detach()  # its dense graph is left unused: the units' own Encode carries the gradients
        with torch.no_grad():  # the kernel's own test, inclusive; a NaN is kept (it must reach the loss)
            units = fused.OpenUnits.where(~((pre - theta) / self.bandwidth < -0.5))
        values = self._pre_at(x, pre, units)
        theta_at = theta[units.cols]
        codes = _JumpReLU.apply(values, theta_at, self.bandwidth)
        x_hat = self._decode_at(codes, units) + self.b_dec
        mse = (x_hat - x).pow(2).sum(-1).mean()
        l0 = _Step.apply(values, theta_at, self.bandwidth).sum() / x.shape[0]
        zero = mse.new_zeros(())
        return Loss(mse + coefficient * l0, mse, l0, zero, x_hat.detach(), units.dense(codes.detach()))

    def loss_reference(self, x: torch.Tensor, coefficient: float) -> Loss:
        """The same loss through plain autograd on dense codes (the dense path, and the tests' oracle)."""
        return self._loss_dense(x, self.pre_activation(x), self.threshold, coefficient)

    def _loss_dense(self, x: torch.Tensor, pre: torch.Tensor, theta: torch.Tensor, coefficient: float) -> Loss:
        codes = _JumpReLU.apply(pre, theta, self.bandwidth)
        x_hat, mse = self._reconstruction_loss(x, codes)
        l0 = _Step.apply(pre, theta, self.bandwidth).sum(-1).mean()
        zero = mse.new_zeros(())
        return Loss(mse + coefficient * l0, mse, l0, zero, x_hat.detach(), codes.detach())

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """θ is in activation units too: t ← t − log s, besides the biases."""
        self.log_threshold.sub_(math.log(scale))
        super().fold_input_scale(scale)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "bandwidth": self.bandwidth}

    @classmethod
    @torch.no_grad()
    def from_parts(cls, parts: "Parts", restore: Mapping[str, Any]) -> Self:
        """θ as read, held as the float32 t whose ``exp`` is θ exactly where float32 allows (codes bit for bit)."""
        sae = cls(parts.d, parts.d_sae, bandwidth=restore.get("bandwidth"))
        sae.log_threshold.copy_(exact_log(parts.threshold))
        sae._fill(parts)
        return sae

    def saelens_form(self, architecture: str) -> SAELensForm:
        """SAE Lens ``jumprelu``: ``W_enc`` ``[d_in, d_sae]``, ``b_enc``, ``threshold`` = exp(t)."""
        tensors = {
            "W_enc": self.W_enc.detach().float().cpu().T,
            "b_enc": self.b_enc.detach().float().cpu(),
            "threshold": self.log_threshold.detach().float().cpu().exp(),
        }
        return SAELensForm(self, tensors, {})


def exact_log(theta: torch.Tensor) -> torch.Tensor:
    """t (float32) with float32 ``exp(t) == θ`` wherever float32 allows (θ = 0 → −inf), so codes match bit for bit."""
    theta = theta.float().clamp_min(0)
    t = theta.double().log().float()
    best, ok = t.clone(), t.exp() == theta
    for direction in (math.inf, -math.inf):
        cand = t
        for _ in range(2):
            cand = torch.nextafter(cand, torch.full_like(cand, direction))
            hit = ~ok & (cand.exp() == theta)
            best, ok = torch.where(hit, cand, best), ok | hit
    return best
