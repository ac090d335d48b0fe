"""The BatchTopK sparse autoencoder (Bussmann et al. 2024; REFERENCE §2b)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch

from circuitsae.dictionaries.fused import OpenUnits
from circuitsae.dictionaries.topk import TopKSAE
from circuitsae.dictionaries.writers import SAELensForm
from circuitsae.errors import CircuitSAEError

if TYPE_CHECKING:
    from circuitsae.dictionaries.formats.core import Parts

#: θ's running mean: an exponential moving average with a horizon of ~100 steps, so that θ reflects the trained
#: SAE, not its random start (a plain mean over a short training, or β = 0.999, keeps the start's values)
THRESHOLD_BETA = 0.99


class BatchTopKSAE(TopKSAE):
    r"""BatchTopK SAE: TopK over the whole batch in training, a threshold at inference.

    Training keeps the ``B·k`` largest (ReLU'd) pre-activations of a batch of B tokens, so L0 varies per
    token with mean k; the auxiliary loss is TopK's, and so is ``Loss.total`` (mse + aux/32, no L0 term).
    The training loss takes a 2-D batch ``[B, d]`` (one token per row) and refuses any other shape. Every step records the smallest kept value, and θ
    is their running mean — an exponential moving average with β = 0.99, started at the first step's
    value (a choice: REFERENCE §2b says a running mean; over a training of a few hundred steps a plain
    mean is dominated by the random start and gives an L0 well under k). Encoding (evaluation,
    patching, anything but training) is the JumpReLU it is saved as::

        f_i = pre_i · 1[pre_i > θ]        one global θ

    In data-parallel training each rank selects over its share of the batch (``B/N·k`` values) and θ
    is updated with the mean of the ranks' statistics, so it stays the same on every rank.
    """

    architecture: ClassVar[str] = "batchtopk"
    reads: ClassVar[Mapping[str, tuple[str, ...]]] = {"dictionary_learning": ("BatchTopKSAE", "MatryoshkaBatchTopKSAE")}
    #: as the JumpReLU it encodes as (its global θ for every feature), as SAE Lens saves its own
    saelens_writes: ClassVar[tuple[str, ...]] = ("jumprelu",)
    _bias_names = ("b_enc", "b_dec", "threshold")

    def __init__(self, d: int, d_dict: int, k: int = 64, k_aux: "int | None" = None) -> None:
        super().__init__(d, d_dict, k, k_aux)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.long))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activation(x)
        return torch.where(pre > self.threshold.clamp_min(0), pre, 0.0)

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activation_features(x, features)
        return torch.where(pre > self.threshold.clamp_min(0), pre, 0.0)

    @staticmethod
    def _check_batch(pre: torch.Tensor) -> None:
        if pre.ndim != 2:
            raise CircuitSAEError(
                f"batchtopk keeps k per token of a [tokens, d] batch: flatten the input first (got {pre.ndim}-D)"
            )

    def _select(self, pre: torch.Tensor) -> tuple[torch.Tensor, "torch.Tensor | None"]:
        self._check_batch(pre)
        acts = pre.relu()
        flat = acts.reshape(-1)
        n = min(self.k * acts.shape[0], flat.numel())
        values, idx = flat.topk(n, sorted=False)
        codes = torch.zeros_like(flat).scatter_(0, idx, values).view_as(acts)
        kept = values[values > 0]
        stat = kept.min().detach() if kept.numel() else self.threshold.clone()  # nothing kept: θ stays
        return codes, stat

    def _select_units(self, pre: torch.Tensor) -> tuple[OpenUnits, "torch.Tensor | None"]:
        self._check_batch(pre)
        acts = pre.relu()
        flat = acts.reshape(-1)
        values, idx = flat.topk(min(self.k * acts.shape[0], flat.numel()), sorted=False)
        kept = values[values > 0]
        stat = kept.min().detach() if kept.numel() else self.threshold.clone()  # nothing kept: θ stays
        return OpenUnits.from_flat(idx.sort().values, tuple(acts.shape)), stat

    @classmethod
    @torch.no_grad()
    def from_parts(cls, parts: "Parts", restore: Mapping[str, Any]) -> Self:
        """k and the global θ as read; θ < 0 (dictionary_learning's −1, "not yet estimated") counts no step."""
        sae = super().from_parts(parts, restore)
        sae.threshold.copy_(parts.threshold.reshape(()))
        sae.threshold_steps.fill_(1 if float(parts.threshold) >= 0 else 0)
        return sae

    def saelens_form(self, architecture: str) -> SAELensForm:
        """SAE Lens ``jumprelu``: ``W_enc`` ``[d_in, d_sae]``, ``b_enc``, the global θ once per feature."""
        tensors = {
            "W_enc": self.W_enc.detach().float().cpu().T,
            "b_enc": self.b_enc.detach().float().cpu(),
            "threshold": self.threshold.detach().float().cpu().expand(self.d_dict),
        }
        return SAELensForm(self, tensors, {})

    def after_step(self, stat: "torch.Tensor | None") -> None:
        if stat is not None:
            self.update_threshold(stat)

    @torch.no_grad()
    def update_threshold(self, smallest_kept: "float | torch.Tensor") -> None:
        """One step of θ's running mean with this batch's smallest kept value."""
        value = torch.as_tensor(smallest_kept, dtype=self.threshold.dtype, device=self.threshold.device)
        if int(self.threshold_steps) == 0:
            self.threshold.copy_(value)
        else:
            self.threshold.mul_(THRESHOLD_BETA).add_((1 - THRESHOLD_BETA) * value)
        self.threshold_steps += 1
