"""The Gated SAE (Rajamanoharan et al. 2024, §3 and App. D/G)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch
from torch import nn

from circuitsae.dictionaries.base import Loss, TrainableDictionary, TrainingDefaults, expansion_width, unit_rows
from circuitsae.dictionaries.fused import GatedLoss
from circuitsae.dictionaries.writers import SAELensForm

if TYPE_CHECKING:
    from circuitsae.dictionaries.formats.core import Parts
    from circuitsae.dictionaries.jumprelu import JumpReLUSAE


class GatedSAE(TrainableDictionary):
    r"""Gated sparse autoencoder: which features fire and how much, decided apart.

    ::

        x_c    = x − b_dec
        π_gate = W_gate x_c + b_gate
        f_gate = 1[π_gate > 0]                          (Heaviside)
        W_mag  = exp(r_mag) ⊙ W_gate                    (row i scaled by e^{r_mag,i})
        f_mag  = ReLU(W_mag x_c + b_mag)
        f̃      = f_gate ⊙ f_mag                         (the codes)
        x̂      = W_decᵀ f̃ + b_dec

        L = ||x − x̂||²                                  reconstruction
          + λ ||ReLU(π_gate)||₁                          sparsity, gate path only
          + ||x − (sg(W_dec)ᵀ ReLU(π_gate) + sg(b_dec))||²   auxiliary (frozen decoder)

    ``sg`` is stop-gradient: the auxiliary term trains the gate path to
    reconstruct on its own, without moving the decoder. Feature directions
    (rows of ``W_dec`` here, ``[d_sae, d]``) are held at unit norm by the
    trainer. With this tying the encoder is one linear map followed by a
    JumpReLU: with ``u = W_mag x_c + b_mag`` and
    ``θ = b_mag − exp(r_mag) ⊙ b_gate``, ``f̃_i = u_i · 1[u_i > max(θ_i, 0)]``
    (:meth:`jumprelu_threshold`).
    """

    architecture: ClassVar[str] = "gated"
    #: Rajamanoharan et al. App. D; λ = 2 gives L0 ≈ 55 at SmolLM2 resid.6 (benchmarks/pareto.py)
    training: ClassVar[TrainingDefaults] = TrainingDefaults(lr=3e-4, betas=(0.0, 0.999), coefficient=2.0)
    resamples_dead: ClassVar[bool] = True
    reads: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "saelens": ("gated",),
        "dictionary_learning": ("GatedAutoEncoder",),
    }
    #: SAE Lens ``gated``, or ``jumprelu`` through :meth:`to_jumprelu`
    saelens_writes: ClassVar[tuple[str, ...]] = ("gated", "jumprelu")
    _bias_names = ("b_gate", "b_mag", "b_dec")

    def __init__(self, d: int, d_dict: int) -> None:
        super().__init__(d, d_dict)
        w = unit_rows(torch.randn(d_dict, d))
        # W_gate starts at W_dec · min(1, 2d/d_sae), as the untied ReLU SAE's encoder does: about half the
        # random features open, and Σ_i ReLU(f_i·x) f_i ≈ (d_sae/2d)·x would overshoot x by that factor.
        self.W_gate = nn.Parameter(w * min(1.0, 2 * d / d_dict))
        self.b_gate = nn.Parameter(torch.zeros(d_dict))
        self.r_mag = nn.Parameter(torch.zeros(d_dict))
        self.b_mag = nn.Parameter(torch.zeros(d_dict))
        self.W_dec = nn.Parameter(w)
        self.b_dec = nn.Parameter(torch.zeros(d))

    def _paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(π_gate, magnitude pre-activation W_mag x_c + b_mag), both ``[..., d_sae]``.

        One matmul serves both: W_mag x_c = e^{r_mag} ⊙ (W_gate x_c).
        """
        shape = (*x.shape[:-1], self.d_dict)
        proj = ((x - self.b_dec).reshape(-1, self.d) @ self.W_gate.T).reshape(shape)
        return proj + self.b_gate, proj * self.r_mag.exp() + self.b_mag

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pi_gate, pre_mag = self._paths(x)
        return torch.where(pi_gate > 0, torch.relu(pre_mag), 0.0)

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        proj = (x - self.b_dec) @ self.W_gate[features].T
        pi_gate = proj + self.b_gate[features]
        pre_mag = proj * self.r_mag[features].exp() + self.b_mag[features]
        return torch.where(pi_gate > 0, torch.relu(pre_mag), 0.0)

    def loss(self, x: torch.Tensor, coefficient: float, mode: str = "auto") -> Loss:
        """The loss above (batch means); hand-written backward unless under autocast.

        ``mode``: "auto" takes the sparse path (fused.py) below ``fused.SPARSE_BELOW`` open gates; "dense" /
        "sparse" force one (the same loss and gradients).
        """
        if torch.is_autocast_enabled(x.device.type):
            return self.loss_reference(x, coefficient)
        params = (self.W_gate, self.b_gate, self.r_mag, self.b_mag, self.W_dec, self.b_dec)
        out = GatedLoss.apply(x, *params, coefficient, mode)
        return Loss(*out)

    def loss_reference(self, x: torch.Tensor, coefficient: float) -> Loss:
        """The same loss through plain autograd (used under autocast, and by the tests as the oracle)."""
        pi_gate, pre_mag = self._paths(x)
        codes = torch.where(pi_gate > 0, torch.relu(pre_mag), 0.0)
        x_hat = self.decode(codes)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        gate = torch.relu(pi_gate)
        sparsity = gate.sum(-1).mean()
        x_aux = gate @ self.W_dec.detach() + self.b_dec.detach()
        aux = (x_aux - x).pow(2).sum(-1).mean()
        return Loss(mse + coefficient * sparsity + aux, mse, sparsity, aux, x_hat, codes)

    @torch.no_grad()
    def jumprelu_threshold(self) -> torch.Tensor:
        """θ = b_mag − exp(r_mag) ⊙ b_gate: the encoder is u ↦ u · 1[u > max(θ, 0)]."""
        return self.b_mag - self.r_mag.exp() * self.b_gate

    @torch.no_grad()
    def to_jumprelu(self) -> "JumpReLUSAE":
        """The JumpReLU SAE this Gated SAE is: ``W_enc = W_mag``, ``b_enc = b_mag``, ``θ = max(θ_gated, 0)``.

        Same codes up to floating-point rounding (``θ = 0`` is held exactly as ``log_threshold = −inf``).
        """
        from circuitsae.dictionaries.jumprelu import JumpReLUSAE

        out = JumpReLUSAE(self.d, self.d_dict).to(self.W_dec.device)
        out.W_enc.copy_(self.r_mag.exp()[:, None] * self.W_gate)
        out.b_enc.copy_(self.b_mag)
        out.W_dec.copy_(self.W_dec)
        out.b_dec.copy_(self.b_dec)
        out.log_threshold.copy_(self.jumprelu_threshold().clamp_min(0).log())
        out.meta = {**self.meta, "exported_from": "gated"}
        return out

    def constrained(self) -> list[nn.Parameter]:
        return [self.W_dec]

    @classmethod
    def for_training(cls, d: int, coefficient: float, options: Mapping[str, Any]) -> Self:
        """``round(gated_expansion · d)`` features (``expansion`` when ``gated_expansion`` is None)."""
        return cls(d, expansion_width(d, options.get("gated_expansion") or options["expansion"]))

    @classmethod
    @torch.no_grad()
    def from_parts(cls, parts: "Parts", restore: Mapping[str, Any]) -> Self:
        """``W_gate`` is the reader's encoder; ``b_gate``, ``r_mag``, ``b_mag`` as read."""
        sae = cls(parts.d, parts.d_sae)
        for name in ("b_gate", "r_mag", "b_mag"):
            getattr(sae, name).copy_(getattr(parts, name))
        sae.W_gate.copy_(parts.W_enc)
        sae.W_dec.copy_(parts.W_dec)
        sae.b_dec.copy_(parts.b_dec)
        return sae

    def saelens_form(self, architecture: str) -> SAELensForm:
        """SAE Lens ``gated`` (``W_enc`` = W_gate ``[d_in, d_sae]``, ``b_gate``, ``r_mag``, ``b_mag``), or the
        ``jumprelu`` this SAE is (:meth:`to_jumprelu`)."""
        if architecture == "jumprelu":
            return self.to_jumprelu().saelens_form("jumprelu")
        tensors = {
            "W_enc": self.W_gate.detach().float().cpu().T,
            "b_gate": self.b_gate.detach().float().cpu(),
            "r_mag": self.r_mag.detach().float().cpu(),
            "b_mag": self.b_mag.detach().float().cpu(),
        }
        return SAELensForm(self, tensors, {})

    @torch.no_grad()
    def resample(self, dead: torch.Tensor, inputs: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Point dead features at ``inputs`` (one row each); returns (param, rows) whose optimiser state to reset."""
        directions = unit_rows(inputs - self.b_dec)
        alive = ~torch.zeros(self.d_dict, dtype=torch.bool, device=dead.device).index_fill_(0, dead, True)
        norm = self.W_gate[alive].norm(dim=-1).mean() if alive.any() else 1.0
        self.W_dec[dead] = directions
        self.W_gate[dead] = directions * 0.2 * norm
        for p in (self.b_gate, self.r_mag, self.b_mag):
            p[dead] = 0.0
        return [(p, dead) for p in (self.W_dec, self.W_gate, self.b_gate, self.r_mag, self.b_mag)]
