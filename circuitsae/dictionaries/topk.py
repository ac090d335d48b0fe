"""The TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"; REFERENCE §2b)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch

from circuitsae.dictionaries import fused
from circuitsae.dictionaries.base import Loss, TrainingDefaults, expansion_width
from circuitsae.dictionaries.encoder import AffineEncoderSAE
from circuitsae.dictionaries.writers import SAELensForm
from circuitsae.errors import CircuitSAEError

if TYPE_CHECKING:
    from circuitsae.dictionaries.formats.core import Parts

#: α_aux, Gao et al.'s 1/32, on the auxiliary error as it is (not divided by its variance; see :class:`TopKSAE`)
AUX_COEFFICIENT = 1 / 32


def keep_top(pre: torch.Tensor, k: int) -> torch.Tensor:
    """ReLU of the ``k`` largest entries of each row of ``pre``; every other entry 0."""
    k = min(int(k), pre.shape[-1])
    if k <= 0:
        return torch.zeros_like(pre)
    if k == pre.shape[-1]:
        return pre.relu()
    values, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, idx, values.relu())


class TopKSAE(AffineEncoderSAE):
    r"""TopK SAE: ``f = ReLU(TopK_k(pre))``; ``k`` sets L0, there is no sparsity penalty.

    ::

        pre  = W_enc (x − b_dec) + b_enc
        f    = ReLU(TopK_k(pre))                       the k largest pre-activations of each token
        x̂    = W_decᵀ f + b_dec
        L    = ||x − x̂||² + α_aux ||e − ê||²           e = x − x̂ (held fixed), α_aux = 1/32
        ê    = W_decᵀ ReLU(TopK_{k_aux}(pre on dead latents))    (no b_dec: it reconstructs the error)

    ``Loss.total`` is that L; ``Loss.sparsity`` is the L0 (reported, not in the total), ``Loss.aux`` the
    auxiliary term before α_aux. The auxiliary term is the squared error itself, as SAE Lens computes it:
    Gao et al.'s released code divides it by e's variance over the batch (a normalised MSE) and this does
    not, so α_aux = 1/32 weighs it differently from theirs wherever that variance is not 1.

    A latent is *dead* for the auxiliary term when the trainer says so (:meth:`set_dead`: it has not fired
    for a window of training steps); with no dead latents the auxiliary term is 0. ``k_aux`` defaults to
    d/2 (Gao et al.). The ``coefficient`` the trainer passes to :meth:`loss` is not used: ``k`` is fixed
    at construction (the trainer builds a TopK run's SAE with k = its coefficient).
    Initialisation: W_enc = W_dec (Gao et al.); b_dec = 0 (they use the geometric median of a batch).
    """

    architecture: ClassVar[str] = "topk"
    #: Gao et al.'s Adam; the coefficient is k
    training: ClassVar[TrainingDefaults] = TrainingDefaults(lr=5e-4, betas=(0.9, 0.999), coefficient=64.0, k=True)
    reads: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "saelens": ("topk",),
        "dictionary_learning": ("AutoEncoderTopK",),
        "sparsify": ("topk",),
    }
    saelens_writes: ClassVar[tuple[str, ...]] = ("topk",)

    def __init__(self, d: int, d_dict: int, k: int = 64, k_aux: "int | None" = None) -> None:
        super().__init__(d, d_dict)
        if int(k) != k or not 1 <= k <= d_dict:
            raise CircuitSAEError(f"{self.architecture}: k must be an integer in [1, d_dict={d_dict}], got {k}")
        if k_aux is not None and (int(k_aux) != k_aux or k_aux < 1):
            raise CircuitSAEError(f"{self.architecture}: k_aux must be an integer >= 1, got {k_aux}")
        self.k = int(k)
        self.k_aux = int(k_aux) if k_aux is not None else max(1, d // 2)
        self.register_buffer("dead", torch.zeros(d_dict, dtype=torch.bool), persistent=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return keep_top(self.pre_activation(x), self.k)

    def set_dead(self, dead: torch.Tensor) -> None:
        """Which latents the auxiliary loss may use (bool ``[d_sae]``)."""
        self.dead.copy_(dead)

    def _select(self, pre: torch.Tensor) -> tuple[torch.Tensor, "torch.Tensor | None"]:
        """Training codes (and the BatchTopK threshold statistic)."""
        return keep_top(pre, self.k), None

    def _select_units(self, pre: torch.Tensor) -> tuple[fused.OpenUnits, "torch.Tensor | None"]:
        """The sparse path's selection: the units :meth:`_select` keeps (some may hold 0 after the ReLU)."""
        return fused.OpenUnits.from_rows(
            pre.topk(min(self.k, pre.shape[-1]), dim=-1, sorted=False).indices, self.d_dict
        ), None

    def loss(self, x: torch.Tensor, coefficient: float = 0.0, mode: str = "auto") -> Loss:
        """L = ||x − x̂||² + α_aux ||e − ê||² (batch means of row sums); ``coefficient`` is unused.

        ``mode`` "auto" takes the sparse path (fused.py) when k / d_sae is under ``fused.SPARSE_BELOW``, and
        the auxiliary term's own path by k_aux / n_dead the same way (dense over the dead units only);
        "dense" / "sparse" force one: the same loss and gradients.
        """
        if not fused.use_sparse(x, mode, self.k / self.d_dict):
            return self.loss_reference(x, coefficient)
        with torch.no_grad():
            pre = self.pre_activation(x)
            units, stat = self._select_units(pre)
        values = self._pre_at(x, pre, units).relu()
        x_hat = self._decode_at(values, units) + self.b_dec
        mse = (x_hat - x).pow(2).sum(-1).mean()
        aux = mse.new_zeros(())
        n_dead = int(self.dead.sum())
        if n_dead:
            err = (x - x_hat).detach()
            k_aux = min(self.k_aux, n_dead)
            if mode == "auto" and not fused.use_sparse(x, mode, k_aux / n_dead):
                # the auxiliary term opens k_aux (d/2 by default) of the n_dead dead units a row: past
                # SPARSE_BELOW dense matmuls over the dead units' columns only are faster than the sparse path
                # (the same term as loss_reference's: the other columns' gradients are 0 there)
                dead_units = self.dead.nonzero().squeeze(1)
                dead_pre = self.pre_activation_features(x, dead_units)
                e_hat = keep_top(dead_pre, k_aux) @ self.W_dec[dead_units]
            else:
                with torch.no_grad():
                    dead_pre = pre.masked_fill(~self.dead, float("-inf"))
                    top = dead_pre.topk(k_aux, dim=-1, sorted=False).indices
                    aux_units = fused.OpenUnits.from_rows(top, self.d_dict)
                e_hat = self._decode_at(self._pre_at(x, pre, aux_units).relu(), aux_units)
            aux = (e_hat - err).pow(2).sum(-1).mean()
        values = values.detach()
        l0 = (values > 0).sum() / x.shape[0]
        return Loss(mse + AUX_COEFFICIENT * aux, mse, l0, aux, x_hat.detach(), units.dense(values), stat)

    def loss_reference(self, x: torch.Tensor, coefficient: float = 0.0) -> Loss:
        """The same loss through plain autograd on dense codes (the dense path, and the tests' oracle)."""
        pre = self.pre_activation(x)
        codes, stat = self._select(pre)
        x_hat, mse = self._reconstruction_loss(x, codes)
        aux = mse.new_zeros(())
        n_dead = int(self.dead.sum())
        if n_dead:
            err = (x - x_hat).detach()
            dead_pre = pre.masked_fill(~self.dead, float("-inf"))
            e_hat = keep_top(dead_pre, min(self.k_aux, n_dead)) @ self.W_dec
            aux = (e_hat - err).pow(2).sum(-1).mean()
        l0 = (codes > 0).sum(-1).float().mean()
        return Loss(mse + AUX_COEFFICIENT * aux, mse, l0, aux, x_hat.detach(), codes.detach(), stat)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.k, "k_aux": self.k_aux}

    @classmethod
    def for_training(cls, d: int, coefficient: float, options: Mapping[str, Any]) -> Self:
        """``round(expansion · d)`` features and k = the coefficient."""
        width = expansion_width(d, options["expansion"])
        if coefficient > width:
            raise CircuitSAEError(
                f"{cls.architecture}: k={coefficient:g} is more than the {width} features of the dictionary"
            )
        return cls(d, width, k=int(coefficient))

    @classmethod
    @torch.no_grad()
    def from_parts(cls, parts: "Parts", restore: Mapping[str, Any]) -> Self:
        """k as read; ``k_aux`` as a round trip recorded it (else its default)."""
        if not isinstance(parts.k, int) or not 1 <= parts.k <= parts.d_sae:
            raise CircuitSAEError(f"k must be an integer in [1, d_sae={parts.d_sae}], got {parts.k!r}")
        sae = cls(parts.d, parts.d_sae, parts.k, k_aux=restore.get("k_aux"))
        sae._fill(parts)
        return sae

    def saelens_form(self, architecture: str) -> SAELensForm:
        """SAE Lens ``topk``: ``W_enc`` ``[d_in, d_sae]``, ``b_enc``, and ``k`` (rows are unit: no rescaling)."""
        tensors = {"W_enc": self.W_enc.detach().float().cpu().T, "b_enc": self.b_enc.detach().float().cpu()}
        return SAELensForm(self, tensors, {"k": int(self.k), "rescale_acts_by_decoder_norm": False})
