"""The affine encoder that the TopK, BatchTopK and JumpReLU SAEs share (REFERENCE §2b).

::

    x_c = x − b_dec
    pre = W_enc x_c + b_enc          W_enc ∈ R^{d_sae×d}
    x̂   = W_decᵀ f + b_dec           unit-norm feature rows of W_dec

The subclasses differ only in how the codes ``f`` are chosen from ``pre``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from circuitsae.dictionaries import fused
from circuitsae.dictionaries.base import TrainableDictionary, unit_rows

if TYPE_CHECKING:
    from circuitsae.dictionaries.formats.core import Parts


class AffineEncoderSAE(TrainableDictionary):
    """Parameters ``W_enc`` ``[d_sae, d]``, ``b_enc`` ``[d_sae]``, ``W_dec`` ``[d_sae, d]``, ``b_dec`` ``[d]``."""

    _bias_names: ClassVar[tuple[str, ...]] = ("b_enc", "b_dec")

    def __init__(self, d: int, d_dict: int, encoder_scale: float = 1.0) -> None:
        super().__init__(d, d_dict)
        w = unit_rows(torch.randn(d_dict, d))
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w * encoder_scale)
        self.b_enc = nn.Parameter(torch.zeros(d_dict))
        self.b_dec = nn.Parameter(torch.zeros(d))

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """W_enc (x − b_dec) + b_enc, ``[..., d_sae]``."""
        flat = torch.addmm(self.b_enc, (x - self.b_dec).reshape(-1, self.d), self.W_enc.T)
        return flat.reshape(*x.shape[:-1], self.d_dict)

    def pre_activation_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc[features].T + self.b_enc[features]

    def _reconstruction_loss(self, x: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_hat = self.decode(codes)
        return x_hat, (x_hat - x).pow(2).sum(-1).mean()

    # -- the sparse training path (fused.py): only the chosen units are encoded, decoded and differentiated --

    def _pre_at(self, x: torch.Tensor, pre: torch.Tensor, units: "fused.OpenUnits") -> torch.Tensor:
        """The pre-activations at ``units`` (``pre`` from a no-grad pass), differentiable through them only."""
        return fused.Encode.apply(x - self.b_dec, self.W_enc, self.b_enc, pre, units)

    def _decode_at(self, values: torch.Tensor, units: "fused.OpenUnits") -> torch.Tensor:
        """``W_decᵀ f`` (no ``b_dec``) for the codes ``values`` at ``units``."""
        return fused.Decode.apply(values, self.W_dec, units)

    def constrained(self) -> list[nn.Parameter]:
        """Parameters whose rows are feature directions held at unit norm."""
        return [self.W_dec]

    def config(self) -> dict[str, Any]:
        return super().config()

    @torch.no_grad()
    def _fill(self, parts: "Parts") -> None:
        """Copy a reader's ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` in (``from_parts``)."""
        self.W_enc.copy_(parts.W_enc)
        self.b_enc.copy_(parts.b_enc)
        self.W_dec.copy_(parts.W_dec)
        self.b_dec.copy_(parts.b_dec)
