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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import safetensors.torch
import torch
from torch import nn

from circuitsae.errors import CircuitSAEError

FORMAT = "circuitsae-dictionary/1"


class Output(NamedTuple):
    """What :meth:`Dictionary.forward` returns."""

    x_hat: torch.Tensor  # [..., d]   reconstruction
    codes: torch.Tensor  # [..., d_dict] feature activations


class Loss(NamedTuple):
    """One training step's loss, per the architecture's definition (REFERENCE §1–2).

    ``total = mse + coefficient · sparsity + aux``; every term is a batch mean of
    a per-row sum, so ``mse`` is E||x − x̂||².
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
    #: parameters that carry activation units (divided by s when the input scale s is folded in)
    _bias_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, d: int, d_dict: int) -> None:
        super().__init__()
        if d < 1 or d_dict < 1:
            raise CircuitSAEError(f"dictionary sizes must be >= 1, got d={d}, d_dict={d_dict}")
        self.d, self.d_dict = int(d), int(d_dict)
        self.meta: dict[str, Any] = {}

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

    # -- training hooks: the trainer calls them on every dictionary; these defaults do nothing ------------
    #: whether the trainer resamples this architecture's dead features (``resample(dead, inputs)``)
    resamples_dead: ClassVar[bool] = False

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups; a group's ``lr_scale`` multiplies the run's learning rate for it."""
        return [{"params": list(self.parameters())}]

    def set_dead(self, dead: torch.Tensor) -> None:
        """Which features have not fired for a while (bool ``[d_dict]``), before each training step."""

    def after_step(self, stat: "torch.Tensor | None") -> None:
        """After each optimiser step, with the step's ``Loss.stat`` (averaged over ranks)."""

    def extra_repr(self) -> str:
        where = " ".join(f"{k}={self.meta[k]}" for k in ("model", "site") if k in self.meta)
        return f"d={self.d}, d_dict={self.d_dict}" + (f", {where}" if where else "")

    # -- save / load -------------------------------------------------------------
    def save(self, path: "str | Path", format: str = "circuitsae", architecture: "str | None" = None) -> Path:
        """Write ``path/sae.safetensors`` then ``path/cfg.json`` (the commit marker), atomically.

        ``format="saelens"`` writes a SAE Lens v6 folder instead (``cfg.json`` + ``sae_weights.safetensors``),
        with ``architecture`` choosing among the forms this dictionary can take there (a Gated SAE:
        ``"gated"`` or ``"jumprelu"``); see :func:`circuitsae.dictionaries.formats.write_saelens`.
        """
        from circuitsae.io import atomic_write

        if format == "saelens":
            from circuitsae.dictionaries.formats import write_saelens

            return write_saelens(self, path, architecture=architecture)
        if format != "circuitsae":
            raise CircuitSAEError(f"unknown format {format!r}: a dictionary saves as 'circuitsae' or 'saelens'")
        if architecture is not None:
            raise CircuitSAEError("architecture= chooses a SAE Lens architecture: it needs format='saelens'")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(path / "sae.safetensors", safetensors.torch.save(tensors))
        cfg = {"format": FORMAT, "architecture": self.architecture, **self.config(), **self.meta}
        atomic_write(path / "cfg.json", json.dumps(cfg, indent=1, default=_json_default).encode())
        return path


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to cfg.json")


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    """``w`` with every row scaled to unit L2 norm."""
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-8)
