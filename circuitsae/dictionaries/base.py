"""The one dictionary interface: activations to codes and back.

Every dictionary — baseline SAE, Gated SAE, TopK, BatchTopK and JumpReLU
SAEs, PCA, the neuron basis, the α = 0 dictionary — is a :class:`Dictionary`:

    codes = encode(x)            x: [..., d]  ->  codes: [..., d_dict]
    x̂     = decode(codes)        x̂ = codes @ W_dec + b_dec
    directions                   W_dec, [d_dict, d], unit-norm rows f_i
    encode_features(x, idx)      encode(x)[..., idx], computing only those codes where it can

Decoding is linear for every kind, so feature patching
(``x' = x + Σ_j (c̄_j − c_j) f_j``), ablation (``x − c_i f_i``) and causal
trees never need to ask which kind they hold. Weights are stored in one
orientation, ``[d_dict, d]``, for encoder and decoder alike.

A class also declares, on itself, what the rest of the library needs to know about its kind (the
architecture registry, :mod:`circuitsae.dictionaries.registry`, lists the classes and answers from these):

    architecture        its name, as in ``cfg.json`` and ``--arch``
    reads               the other formats' names it is read from, per format (``{"saelens": ("standard",)}``)
    saelens_writes      the SAE Lens architectures it can be written as, its default first
    from_parts          how a reader's weights become one (:mod:`circuitsae.dictionaries.formats`)
    saelens_form        its tensors as one SAE Lens architecture holds them

and a :class:`TrainableDictionary` its training defaults (:class:`TrainingDefaults`) and the hooks the
trainer calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Self

import torch
from torch import nn

from circuitsae.dictionaries.writers import SAELensForm, write_circuitsae, write_saelens
from circuitsae.errors import CircuitSAEError

if TYPE_CHECKING:
    from circuitsae.dictionaries.formats.core import Parts


class Output(NamedTuple):
    """What :meth:`Dictionary.forward` returns."""

    x_hat: torch.Tensor  # [..., d]   reconstruction
    codes: torch.Tensor  # [..., d_dict] feature activations


class Loss(NamedTuple):
    """One training step's loss, per the architecture's definition (REFERENCE §1–2).

    Every term is a batch mean of a per-row sum, so ``mse`` is E||x − x̂||². What ``total`` (the
    term that is differentiated) is depends on the architecture:

    ==========  ====================================  ==================================  ==================
    arch        total                                 sparsity                            aux
    ==========  ====================================  ==================================  ==================
    relu        mse + α · sparsity                    L1 of the codes                     0
    gated       mse + λ · sparsity + aux              L1 of ReLU(π_gate)                  frozen-decoder mse
    topk,       mse + aux / 32                        L0 (reported, not in total; k sets  the dead latents'
    batchtopk                                         it)                                 error reconstruction
    jumprelu    mse + λ · sparsity                    L0 (straight-through gradients)     0
    ==========  ====================================  ==================================  ==================
    """

    total: torch.Tensor
    mse: torch.Tensor
    sparsity: torch.Tensor
    aux: torch.Tensor
    x_hat: torch.Tensor  # [B, d]
    codes: torch.Tensor  # [B, d_dict]
    #: BatchTopK: the batch's smallest kept code, which the trainer averages over ranks into the threshold
    stat: "torch.Tensor | None" = None


class Dictionary(nn.Module):
    """Base class: subclasses define ``encode``, ``W_dec`` and ``b_dec``.

    ``meta`` holds where the dictionary belongs (model, site) and how it was
    made (input scale, training summary, metrics); it is saved in ``cfg.json``.
    """

    architecture: ClassVar[str]
    #: saved tensors that may hold −inf (a JumpReLU's log θ where θ = 0); NaN and +inf are refused in all
    minus_infinity_allowed: ClassVar[tuple[str, ...]] = ()
    #: parameters that carry activation units (divided by s when the input scale s is folded in)
    _bias_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, d: int, d_dict: int) -> None:
        super().__init__()
        if d < 1 or d_dict < 1:
            raise CircuitSAEError(f"dictionary sizes must be >= 1, got d={d}, d_dict={d_dict}")
        self.d, self.d_dict = int(d), int(d_dict)
        self.meta: dict[str, Any] = {}
        #: the folder it was loaded from (:func:`~circuitsae.dictionaries.load_dictionary`), None if made here;
        #: paths in ``meta`` (its activation store) are relative to it
        self.folder: "Path | None" = None

    # -- the interface ---------------------------------------------------------
    # Subclasses set ``W_dec`` ([d_dict, d], unit-norm rows) and ``b_dec`` ([d] or None).
    W_dec: torch.Tensor
    b_dec: "torch.Tensor | None"

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``encode(x)[..., features]``; sparse autoencoders override it to compute only those codes."""
        return self.encode(x)[..., features]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """x̂ = codes @ W_dec (+ b_dec)."""
        x_hat = codes @ self.W_dec
        return x_hat if self.b_dec is None else x_hat + self.b_dec

    @property
    def directions(self) -> torch.Tensor:
        """Feature directions f_i, ``[d_dict, d]``, unit norm (the rows of W_dec)."""
        return self.W_dec

    def forward(self, x: torch.Tensor) -> Output:
        codes = self.encode(x)
        return Output(self.decode(codes), codes)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (saved in ``cfg.json``)."""
        return {"d": self.d, "d_dict": self.d_dict}

    def check_input(self, x: torch.Tensor, where: str = "") -> None:
        """Raise a one-line error if ``x``'s last dimension is not ``d``."""
        if x.shape[-1] != self.d:
            raise CircuitSAEError(
                f"{self.architecture} dictionary expects d={self.d} but {where or 'the input'} has d={x.shape[-1]}"
            )

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make a dictionary trained on ``scale · x`` take raw ``x``.

        Every architecture here is positively homogeneous in (input, biases):
        dividing the biases by ``scale`` gives codes and reconstructions in raw
        units (codes shrink by ``1/scale``; directions stay unit norm).
        """
        for name in self._bias_names:
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor):
                t.div_(scale)
        self.meta["input_scale_folded"] = float(scale)

    def extra_repr(self) -> str:
        where = " ".join(f"{k}={self.meta[k]}" for k in ("model", "site") if k in self.meta)
        return f"d={self.d}, d_dict={self.d_dict}" + (f", {where}" if where else "")

    # -- formats: what this class is read from and written as ---------------------------------------------
    #: the other formats' names this class is read from, per format; where two registered classes read one
    #: name, the registry's first is chosen unless the file names the other (:mod:`.registry`)
    reads: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    #: the SAE Lens architectures this class can be written as, its default first (empty: it cannot be)
    saelens_writes: ClassVar[tuple[str, ...]] = ()
    #: what this kind is, for the refusal when it has no SAE Lens form ("SAE Lens has no architecture for ...")
    saelens_refusal: ClassVar[str] = "this kind"

    @classmethod
    def from_parts(cls, parts: "Parts", restore: Mapping[str, Any]) -> Self:
        """The dictionary holding a reader's weights (already in circuitsae's orientation, folded, float32).

        ``restore`` holds constructor arguments a circuitsae round trip recorded in the file (may be empty).
        """
        raise CircuitSAEError(f"{cls.architecture}: no reader builds this class")

    def saelens_form(self, architecture: str) -> SAELensForm:
        """This dictionary's encoder-side tensors as SAE Lens ``architecture`` holds them (one of ``saelens_writes``)."""
        raise CircuitSAEError(f"a {self.architecture} dictionary has no SAE Lens form")

    # -- save / load -------------------------------------------------------------
    def save(self, path: "str | Path", format: str = "circuitsae", architecture: "str | None" = None) -> Path:
        """Write ``path/sae.safetensors``, ``path/manifest.json`` (sizes and sha256), then ``path/cfg.json`` (the
        commit marker), each atomically.

        ``format="saelens"`` writes a SAE Lens v6 folder instead (``cfg.json`` + ``sae_weights.safetensors``),
        with ``architecture`` choosing among the forms this dictionary can take there (a Gated SAE:
        ``"gated"`` or ``"jumprelu"``); see :func:`circuitsae.dictionaries.writers.write_saelens`.
        """
        if format == "saelens":
            return write_saelens(self, path, architecture=architecture)
        if format != "circuitsae":
            raise CircuitSAEError(f"unknown format {format!r}: a dictionary saves as 'circuitsae' or 'saelens'")
        if architecture is not None:
            raise CircuitSAEError("architecture= chooses a SAE Lens architecture: it needs format='saelens'")
        return write_circuitsae(self, path)


@dataclass(frozen=True)
class TrainingDefaults:
    """How the trainer trains an architecture unless told otherwise (``circuitsae train`` flags override)."""

    #: Adam's learning rate
    lr: float
    #: Adam's (β1, β2)
    betas: tuple[float, float]
    #: the sparsity coefficient of a run that names none (α, λ; k for a k-architecture)
    coefficient: float
    #: the coefficient is k, the features kept per token (a whole number >= 1), not a penalty's weight
    k: bool = False


class TrainableDictionary(Dictionary):
    """A dictionary the trainer (:mod:`circuitsae.training.trainer`) can train: what it declares and calls.

    Per step the trainer calls :meth:`set_dead`, :meth:`loss` (or, under autocast inside ``loss``,
    :meth:`loss_reference`), removes the gradient along the rows of :meth:`constrained` and renormalises
    them, steps Adam over :meth:`param_groups`, then calls :meth:`after_step`; every resampling window it
    calls :meth:`resample` when ``resamples_dead``. :meth:`for_training` makes a run's fresh dictionary.
    """

    #: the trainer's defaults for this architecture
    training: ClassVar[TrainingDefaults]
    #: whether the trainer resamples this architecture's dead features (``resample(dead, inputs)``)
    resamples_dead: ClassVar[bool] = False

    @classmethod
    def for_training(cls, d: int, coefficient: float, options: Mapping[str, Any]) -> Self:
        """A fresh dictionary for a run on width-``d`` activations with this ``coefficient``.

        ``options`` are the run's settings by name (the fields of ``TrainConfig``: ``expansion``, ``tied``,
        ``decoder_bias``, ``gated_expansion``, ...); each class reads those that concern it. By default the
        dictionary has ``round(expansion · d)`` features.
        """
        return cls(d, expansion_width(d, options["expansion"]))

    def loss(self, x: torch.Tensor, coefficient: float, mode: str = "auto") -> Loss:  # pragma: no cover - abstract
        """One step's :class:`Loss` on a batch ``x`` ``[B, d]``; ``mode`` "auto", "dense" or "sparse" (fused.py)."""
        raise NotImplementedError

    def loss_reference(self, x: torch.Tensor, coefficient: float) -> Loss:  # pragma: no cover - abstract
        """The same loss through plain autograd (used under autocast, and by the tests as the oracle)."""
        raise NotImplementedError

    def constrained(self) -> list[nn.Parameter]:  # pragma: no cover - abstract
        """Parameters whose rows are feature directions held at unit norm."""
        raise NotImplementedError

    def resample(self, dead: torch.Tensor, inputs: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Point the ``dead`` features (indices) at ``inputs`` (one row each); returns (param, rows) whose
        optimiser state to reset. Called only when ``resamples_dead``."""
        raise CircuitSAEError(f"{self.architecture} does not resample dead features")

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups; a group's ``lr_scale`` multiplies the run's learning rate for it."""
        return [{"params": list(self.parameters())}]

    def set_dead(self, dead: torch.Tensor) -> None:
        """Which features have not fired for a while (bool ``[d_dict]``), before each training step."""

    def after_step(self, stat: "torch.Tensor | None") -> None:
        """After each optimiser step, with the step's ``Loss.stat`` (averaged over ranks)."""


def expansion_width(d: int, expansion: float) -> int:
    """A dictionary's width for an expansion factor: ``max(1, round(expansion · d))``."""
    return max(1, round(expansion * d))


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    """``w`` with every row scaled to unit L2 norm."""
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-8)
