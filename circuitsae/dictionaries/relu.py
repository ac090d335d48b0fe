"""The baseline ReLU/L1 sparse autoencoder (Cunningham et al. 2023, §2 and App. B–C)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch
from torch import nn

from circuitsae.dictionaries.base import Loss, TrainableDictionary, TrainingDefaults, expansion_width, unit_rows
from circuitsae.dictionaries.fused import ReluLoss
from circuitsae.dictionaries.writers import SAELensForm

if TYPE_CHECKING:
    from circuitsae.dictionaries.formats.core import Parts


class ReluSAE(TrainableDictionary):
    r"""Baseline sparse autoencoder with an L1 penalty.

    Paper form (``tied=True, decoder_bias=False``, the default)::

        c    = ReLU(M x + b)          M ∈ R^{d_sae×d}, rows unit-norm
        x̂    = Mᵀ c
        L(x) = ||x − x̂||²₂ + α ||c||₁

    Untied (``tied=False``, App. C.3): ``c = ReLU(M_e x + b)``, ``x̂ = M_dᵀ c``
    with unit-norm rows of M_d. With ``decoder_bias=True`` a learned ``b_dec``
    is subtracted before the encoder and added after the decoder (the variant
    later libraries use). Rows are kept unit norm by the trainer (the gradient
    component along each row is removed, then rows are renormalised), so the
    L1 term cannot be lowered by scaling. An "α = 0 dictionary" is this SAE
    trained with α = 0.

    Stored as ``W_dec`` ``[d_sae, d]`` (= M, or M_d), ``W_enc_untied`` ``[d_sae, d]``
    when untied, ``b_enc`` ``[d_sae]`` and ``b_dec`` ``[d]`` when present.
    """

    architecture: ClassVar[str] = "relu"
    #: Cunningham et al. App. B; α = 1 gives L0 ≈ 75 at SmolLM2 resid.6 (benchmarks/pareto.py)
    training: ClassVar[TrainingDefaults] = TrainingDefaults(lr=1e-3, betas=(0.9, 0.999), coefficient=1.0)
    resamples_dead: ClassVar[bool] = True
    reads: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "saelens": ("standard",),
        "dictionary_learning": ("AutoEncoder", "AutoEncoderNew"),
    }
    saelens_writes: ClassVar[tuple[str, ...]] = ("standard",)
    _bias_names = ("b_enc", "b_dec")

    def __init__(self, d: int, d_dict: int, tied: bool = True, decoder_bias: bool = False) -> None:
        super().__init__(d, d_dict)
        self.tied, self.decoder_bias = bool(tied), bool(decoder_bias)
        w = unit_rows(torch.randn(d_dict, d))
        self.W_dec = nn.Parameter(w)
        # Untied: start the encoder at W_dec · min(1, 2d/d_sae). With random unit rows about half
        # the features fire and Σ_i ReLU(f_i·x) f_i ≈ (d_sae / 2d)·x, so this makes x̂ ≈ x at init
        # instead of overshooting by d_sae/2d (the tied form cannot do this and takes longer to settle).
        self.W_enc_untied = None if tied else nn.Parameter(w * min(1.0, 2 * d / d_dict))
        self.b_enc = nn.Parameter(torch.zeros(d_dict))
        self.b_dec = nn.Parameter(torch.zeros(d)) if decoder_bias else None

    @property
    def W_enc(self) -> torch.Tensor:  # noqa: N802
        """Encoder rows: W_dec itself when tied."""
        return self.W_dec if self.W_enc_untied is None else self.W_enc_untied

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """M (x − b_dec) + b, before the ReLU."""
        if self.b_dec is not None:
            x = x - self.b_dec
        return torch.addmm(self.b_enc, x.reshape(-1, self.d), self.W_enc.T).reshape(*x.shape[:-1], self.d_dict)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_activation(x))

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if self.b_dec is not None:
            x = x - self.b_dec
        return torch.relu(x @ self.W_enc[features].T + self.b_enc[features])

    def loss(self, x: torch.Tensor, coefficient: float, mode: str = "auto") -> Loss:
        """L = ||x − x̂||² + α ||c||₁ (batch means); hand-written backward unless under autocast.

        ``mode``: "auto" takes the sparse path (fused.py) below ``fused.SPARSE_BELOW`` open units; "dense" /
        "sparse" force one (the same loss and gradients).
        """
        if torch.is_autocast_enabled(x.device.type):
            return self.loss_reference(x, coefficient)
        args = (x, self.W_enc, self.W_dec, self.b_enc, self.b_dec, coefficient, mode)
        total, mse, l1, x_hat, codes = ReluLoss.apply(*args)
        return Loss(total, mse, l1, mse.new_zeros(()), x_hat, codes)

    def loss_reference(self, x: torch.Tensor, coefficient: float) -> Loss:
        """The same loss through plain autograd (used under autocast, and by the tests as the oracle)."""
        codes = self.encode(x)
        x_hat = self.decode(codes)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        l1 = codes.sum(-1).mean()  # codes >= 0
        zero = mse.new_zeros(())
        return Loss(mse + coefficient * l1, mse, l1, zero, x_hat, codes)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "tied": self.tied, "decoder_bias": self.decoder_bias}

    @classmethod
    def for_training(cls, d: int, coefficient: float, options: Mapping[str, Any]) -> Self:
        """``round(expansion · d)`` features, ``tied`` and ``decoder_bias`` as the run says."""
        width = expansion_width(d, options["expansion"])
        return cls(d, width, tied=options["tied"], decoder_bias=options["decoder_bias"])

    @classmethod
    @torch.no_grad()
    def from_parts(cls, parts: "Parts", restore: Mapping[str, Any]) -> Self:
        """Untied unless a round trip says tied and the encoder is the decoder; ``b_dec`` kept unless zero and
        recorded absent."""
        tied = bool(restore.get("tied")) and torch.equal(parts.W_enc, parts.W_dec)
        decoder_bias = restore.get("decoder_bias") is not False or bool(parts.b_dec.any())
        sae = cls(parts.d, parts.d_sae, tied=tied, decoder_bias=decoder_bias)
        if not tied:
            sae.W_enc_untied.copy_(parts.W_enc)
        sae.b_enc.copy_(parts.b_enc)
        sae.W_dec.copy_(parts.W_dec)
        if sae.b_dec is not None:
            sae.b_dec.copy_(parts.b_dec)
        return sae

    def saelens_form(self, architecture: str) -> SAELensForm:
        """SAE Lens ``standard``: ``W_enc`` ``[d_in, d_sae]``, ``b_enc``."""
        tensors = {"W_enc": self.W_enc.detach().float().cpu().T, "b_enc": self.b_enc.detach().float().cpu()}
        return SAELensForm(self, tensors, {})

    def constrained(self) -> list[nn.Parameter]:
        """Parameters whose rows are feature directions held at unit norm."""
        return [self.W_dec]

    @torch.no_grad()
    def resample(self, dead: torch.Tensor, inputs: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Point dead features at ``inputs`` (one row each); returns (param, rows) whose optimiser state to reset."""
        directions = unit_rows(inputs - (0 if self.b_dec is None else self.b_dec))
        alive = ~torch.zeros(self.d_dict, dtype=torch.bool, device=dead.device).index_fill_(0, dead, True)
        self.W_dec[dead] = directions
        touched = [(self.W_dec, dead), (self.b_enc, dead)]
        if self.W_enc_untied is not None:
            norm = self.W_enc_untied[alive].norm(dim=-1).mean() if alive.any() else 1.0
            self.W_enc_untied[dead] = directions * 0.2 * norm
            touched.append((self.W_enc_untied, dead))
        self.b_enc[dead] = 0.0
        return touched
