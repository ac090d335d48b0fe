r"""Other libraries' SAE folders: detect, read, write, refuse.

:func:`circuitsae.dictionaries.load_dictionary` asks :func:`detect_format` what a folder is and
:func:`read_foreign` reads the three peers' folders into the circuitsae class that computes the same
codes (which class: :mod:`circuitsae.dictionaries.registry`, from what each class declares it ``reads``); :func:`write_saelens` (``dictionary.save(path, format="saelens")``) writes a SAE Lens v6 folder
that SAE Lens itself loads. A file is never read into something that computes other codes: every
setting that cannot be honoured exactly is refused with one sentence naming it.

Formats (what :func:`detect_format` looks for):

====================  =====================================================================================
circuitsae            ``cfg.json`` with ``"format": "circuitsae-dictionary/1"`` + ``sae.safetensors``
saelens               ``cfg.json`` + ``sae_weights.safetensors`` (v6 nested ``metadata``, or the flat
                      configs of SAE Lens < 6 with ``hook_point``, ``activation_fn_str``, ...)
dictionary_learning   ``ae.pt`` (a state dict, read with ``torch.load(weights_only=True)``) + ``config.json``
                      (``trainer.dict_class`` names the class: the keys of AutoEncoderTopK and BatchTopKSAE
                      are the same, so the class is never guessed from them)
sparsify              ``cfg.json`` (``d_in``, ``k``, ...) + ``sae.safetensors``; a run folder holding one
                      such subfolder per hookpoint (``layers.6``, ``layers.6.mlp``, or ``layers.6/seed0``)
                      is named in the error, and each subfolder loads with the run's ``config.json``
                      (model, ``ctx_len``) read from beside it
====================  =====================================================================================

Architectures: each peer's encoder as its code writes it (``x̃ = x − b_dec``, ``pre = x̃ W_enc + b_enc``)
and the circuitsae class that computes the same codes::

    SAE Lens standard                  ReLU(pre)                              -> ReluSAE(tied=False, decoder_bias=True)
    SAE Lens gated                     1[x̃ W + b_gate > 0] · ReLU(x̃ (W ⊙ e^r_mag) + b_mag)       -> GatedSAE
    SAE Lens jumprelu (BatchTopK and   ReLU(pre) · 1[pre > θ_i]               -> JumpReLUSAE, θ = max(θ_i, 0)
      Matryoshka are saved as it)
    SAE Lens topk                      ReLU(TopK_k(pre)) (k in cfg)           -> TopKSAE(k)
    d_l AutoEncoder                    ReLU(W (x − bias) + b)                 -> ReluSAE(tied=False, decoder_bias=True)
    d_l AutoEncoderNew                 ReLU(W x + b); x̂ = f Wdᵀ + b_dec       -> ReluSAE (b_dec folded into b)
    d_l GatedAutoEncoder               as SAE Lens gated                      -> GatedSAE
    d_l AutoEncoderTopK                TopK_k(ReLU(pre)), buffer k            -> TopKSAE(k) (buffer threshold unused)
    d_l BatchTopKSAE, Matryoshka...    ReLU(pre) · 1[ReLU(pre) > θ], buffer θ -> BatchTopKSAE(k), θ the buffer
    d_l JumpReluAutoEncoder            ReLU(pre · 1[pre > θ_i]), pre = x W_enc + b_enc (no b_dec) -> JumpReLUSAE
    sparsify TopK (activation topk)    TopK_k(ReLU(x̃ Wᵀ + b))                 -> TopKSAE(k)

(d_l = dictionary_learning; its BatchTopK classes encode with the threshold by default; θ = −1, its
"not yet estimated", makes that a plain ReLU, as circuitsae's ``max(θ, 0)`` does.)

``apply_b_dec_to_input: false`` (and the peers whose encoder reads x itself) is exact in circuitsae's
form: ``b_enc ← b_enc + W_enc b_dec`` (gated: ``b_gate += W b_dec``, ``b_mag += e^{r_mag} W b_dec``).
Orientation is checked from shapes against the sizes the config states; when ``d_in == d_sae`` a
transposed matrix cannot be told from shapes, and each format's own convention is taken (SAE Lens
``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``; dictionary_learning ``nn.Linear`` weights
``encoder.weight [d_sae, d_in]``, ``decoder.weight [d_in, d_sae]``, its raw parameters as SAE Lens;
sparsify ``encoder.weight [d_sae, d_in]``, ``W_dec [d_sae, d_in]``).

Decoder norms. circuitsae holds unit-norm decoder rows. A row norm n_i is folded where the
architecture is positively homogeneous per feature — ReLU, JumpReLU (θ_i·n_i), Gated (b_gate, b_mag
scaled; the gate's sign is kept), BatchTopK (its global θ becomes θ·n_i: a JumpReLUSAE) — by scaling
feature i's encoder row, bias and threshold by n_i and its decoder row by 1/n_i: the reconstruction is
unchanged and code i is the file's code times n_i, which ``meta["codes_scaled_by_decoder_norm"]``
records with the norms' range (SAE Lens's ``fold_W_dec_norm`` and dictionary_learning's
``normalize_decoder`` fold the same way). Norms within ``NORM_TOLERANCE`` of 1 (a decoder normalised
in float32) are kept as they are, so codes are the file's bit for bit. TopK is not homogeneous per
feature: scaling codes by different n_i changes which k fire. SAE Lens's
``rescale_acts_by_decoder_norm`` selects the top k of ``pre·n`` and decodes ``(f/n) W_dec`` — exactly a
TopK SAE with the norms folded, so it is folded and its codes are SAE Lens's own; without it, decoder
norms that are neither unit nor all equal (within ``NORM_TOLERANCE``) are refused; equal norms are
one positive scale and fold exactly. A zero decoder row (a direction that does not exist) is refused.

Sites. Hook names map to circuitsae sites only where they name the same tensor; the tables and
functions are in :mod:`circuitsae.sites` (``transformer_lens_site``, ``module_site``,
``dictionary_learning_site``, ``site_to_hook``).

Not mapped (kept under ``meta["source"]``): ``hook_resid_mid``, ``hook_z``, ``mlp.hook_post``, any
``hook_head_index``, embeddings, a model loaded with ``center_writing_weights`` (TransformerLens's
centred residual stream is not the model's), and a bare dictionary_learning ``layer``.

Refused, one sentence each: an unknown or training-only architecture (SAE Lens ``batchtopk``,
transcoders, ``abstopk``, ...; dictionary_learning classes not above; sparsify ``groupmax``,
``transcode``, ``skip_connection``/``W_skip``), missing, unexpected or mis-shaped tensors, NaN or inf,
``normalize_activations`` other than ``none`` (SAE Lens applies ``expected_average_only_in`` only when
it folds a scaling factor it finds in its release directory, which a folder does not carry;
``constant_norm_rescale``/``layer_norm`` are per-token and no dictionary here can hold them),
``reshape_activations`` other than ``none``, a ``finetuning_scaling_factor``, a pre-6 ``activation_fn``
other than relu/topk, TopK decoder norms as above, a ``k`` that disagrees between config and buffer.

Written (SAE Lens v6, :mod:`circuitsae.dictionaries.writers`): the layout there; each class declares the
SAE Lens architectures it can be written as (``saelens_writes``): ReLU → ``standard``, Gated → ``gated`` (or
``jumprelu`` via :meth:`GatedSAE.to_jumprelu`), TopK → ``topk``, BatchTopK → ``jumprelu`` with its global θ
broadcast, JumpReLU → ``jumprelu`` (θ = exp(log θ)); PCA and the identity have no SAE Lens architecture and
are refused.

The package: :mod:`.core` (this specification, detection, the checks and the fold every reader shares),
:mod:`.saelens`, :mod:`.dictionary_learning`, :mod:`.sparsify` (one reader each), and :func:`read_foreign`
in the package itself, which dispatches to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from circuitsae.dictionaries import registry
from circuitsae.dictionaries.base import Dictionary
from circuitsae.dictionaries.integrity import check_arguments, check_finite, positive_int, read_json
from circuitsae.dictionaries.writers import FORMAT
from circuitsae.errors import CircuitSAEError

if TYPE_CHECKING:
    from torch import Tensor

FORMATS = ("circuitsae", "saelens", "dictionary_learning", "sparsify")
#: decoder rows whose norms are within this of 1 are unit already (float32 normalisation leaves ~1e-7)
NORM_TOLERANCE = 1e-5


# -- detection ---------------------------------------------------------------------------------------------
def detect_format(path: "str | Path") -> str:
    """Which of :data:`FORMATS` the folder ``path`` is; a one-line error if none.

    A folder whose ``cfg.json`` has a ``format`` key is circuitsae's (``load_dictionary`` then checks it).
    """
    path = Path(path)
    cfg_path = path / "cfg.json"
    if (path / "ae.pt").is_file():
        return "dictionary_learning"
    if not cfg_path.is_file():
        if path.is_dir():
            subs = sorted(p.name for p in path.iterdir() if p.is_dir() and _holds_dictionaries(p))
            if subs:
                shown = ", ".join(subs[:6]) + (", ..." if len(subs) > 6 else "")
                raise CircuitSAEError(
                    f"{path} holds {len(subs)} dictionaries, one per subfolder ({shown}): "
                    f"load one of them, e.g. {path / subs[0]}"
                )
        what = "does not exist" if not path.exists() else "has no cfg.json"
        raise CircuitSAEError(
            f"{path} {what}: not a saved dictionary (expected sae.safetensors + cfg.json, or a SAE Lens, "
            "dictionary_learning or sparsify folder)"
        )
    cfg = read_json(cfg_path)
    if isinstance(cfg, dict) and "format" not in cfg:
        if (path / "sae_weights.safetensors").is_file():
            return "saelens"
        if (path / "sae.safetensors").is_file() and "d_in" in cfg and "architecture" not in cfg:
            return "sparsify"
    return "circuitsae"


def looks_like_dictionary(p: Path) -> bool:
    """Whether folder ``p`` is a saved dictionary of any format (what ``circuitsae eval DIR`` lists): a
    ``cfg.json`` (circuitsae, SAE Lens, sparsify) or an ``ae.pt`` (dictionary_learning); the loader checks the rest."""
    return (p / "cfg.json").is_file() or (p / "ae.pt").is_file()


def _holds_dictionaries(p: Path) -> bool:
    """A dictionary, or a folder of them one level down (sparsify's ``layers.6/seed0``)."""
    return looks_like_dictionary(p) or any(q.is_dir() and looks_like_dictionary(q) for q in p.iterdir())


# -- the weights every reader produces ---------------------------------------------------------------------
@dataclass
class Parts:
    """One SAE in circuitsae's orientation (rows are features), float32, before folding (folds run in float64).

    The readers fill it; :func:`build` folds it and hands it to the chosen class's ``from_parts``.
    """

    #: the encoder's form, named as the circuitsae architecture of that form: relu | gated | jumprelu | topk |
    #: batchtopk (the folds depend on it: TopK is not homogeneous per feature, BatchTopK's θ is global)
    kind: str
    d: int
    d_sae: int
    W_enc: "Tensor"  # [d_sae, d]; gated: W_gate
    W_dec: "Tensor"  # [d_sae, d]
    b_dec: "Tensor"  # [d]
    b_enc: "Tensor | None" = None  # [d_sae]
    b_gate: "Tensor | None" = None
    r_mag: "Tensor | None" = None
    b_mag: "Tensor | None" = None
    threshold: "Tensor | None" = None  # jumprelu [d_sae]; batchtopk a scalar
    k: "int | None" = None
    rescale: bool = False  # topk: SAE Lens's rescale_acts_by_decoder_norm
    centred: bool = True  # the encoder reads x − b_dec (False: x itself)


def check_tensors(where: str, tensors: dict[str, "Tensor"], expected: dict[str, tuple], what: str) -> None:
    """Missing, unexpected and mis-shaped tensors, integers where floats belong, NaN/inf: one sentence each."""
    missing, extra = sorted(set(expected) - set(tensors), key=str), sorted(set(tensors) - set(expected), key=str)
    if missing or extra:
        raise CircuitSAEError(
            f"{where} does not hold a {what}: missing {missing}, unexpected {extra} (expected {sorted(expected)})"
        )
    for k, shape in expected.items():
        got = tuple(tensors[k].shape)
        if got != tuple(shape):
            hint = " (transposed?)" if len(got) == 2 and got == tuple(shape)[::-1] else ""
            raise CircuitSAEError(f"{where}: {k} has shape {got} but a {what} of these sizes has {tuple(shape)}{hint}")
        if tensors[k].is_complex():
            raise CircuitSAEError(f"{where}: {k} holds complex numbers ({tensors[k].dtype})")
    check_finite(where, tensors)


def load_safetensors(p: Path) -> dict[str, "Tensor"]:
    try:
        return safetensors.torch.load_file(p)
    except Exception as e:  # safetensors raises several types for a bad header
        raise CircuitSAEError(f"{p} is not a readable safetensors file ({e})") from None


def f32(t: "Tensor") -> "Tensor":
    return t.detach().to("cpu", torch.float32)


@torch.no_grad()
def build(
    p: Parts,
    where: str,
    meta: dict[str, Any],
    cls: "type[Dictionary] | None" = None,
    restore: "dict | None" = None,
    restore_for: "str | None" = None,
) -> Dictionary:
    """Fold b_dec and the decoder norms, then fill the class (module docstring: decoder norms).

    ``cls`` is the class the reader chose from the registry (default: the one named ``p.kind``); a fold that
    turns the weights into another architecture (``p.kind`` changes) takes that one. ``restore`` (constructor
    arguments a round trip recorded) is used when the class built is ``restore_for``.
    """
    kind = p.kind
    f64 = torch.float64  # folds are computed in float64, one tensor at a time, and stored in float32
    if not p.centred:  # pre = W x + b = W (x − b_dec) + (b + W b_dec)
        shift = p.W_enc.to(f64) @ p.b_dec.to(f64)
        if p.kind == "gated":
            p.b_gate = (p.b_gate.to(f64) + shift).float()
            p.b_mag = (p.b_mag.to(f64) + p.r_mag.to(f64).exp() * shift).float()
        else:
            p.b_enc = (p.b_enc.to(f64) + shift).float()
    n = p.W_dec.to(f64).norm(dim=1)
    if bool((n == 0).any()):
        raise CircuitSAEError(
            f"{where}: {int((n == 0).sum())} decoder rows are all zero (features without a direction); "
            "circuitsae needs a unit-norm direction for every feature"
        )
    near_unit = float((n - 1).abs().max()) <= NORM_TOLERANCE
    scale = None  # (per-feature norms) or a scalar folded
    if p.kind == "topk" and p.rescale:
        scale = n  # SAE Lens: TopK of pre·n, decode (f/n) W_dec: codes stay SAE Lens's own
    elif near_unit:
        pass
    elif p.kind == "topk":
        if float(n.max() / n.min() - 1) > NORM_TOLERANCE:
            raise CircuitSAEError(
                f"{where}: a TopK SAE whose decoder rows are not unit norm (norms {float(n.min()):.4g} to "
                f"{float(n.max()):.4g}) and not rescaled by them (no rescale_acts_by_decoder_norm): scaling its "
                "codes by the norms would change which k features fire"
            )
        scale = n.mean().expand_as(n)  # one positive scale: TopK(s·pre) = s·TopK(pre)
        meta["codes_scaled_by_decoder_norm"] = _scaled_note(scale)
    else:
        scale = n
        meta["codes_scaled_by_decoder_norm"] = _scaled_note(n)
    if scale is not None:
        p.W_enc = (p.W_enc.to(f64) * scale[:, None]).float()
        p.W_dec = (p.W_dec.to(f64) / scale[:, None]).float()
        for name in ("b_enc", "b_gate", "b_mag"):
            if getattr(p, name) is not None:
                setattr(p, name, (getattr(p, name).to(f64) * scale).float())
        if p.kind == "jumprelu":
            p.threshold = (p.threshold.to(f64).clamp_min(0) * scale).float()
        elif p.kind == "batchtopk":  # a global θ becomes θ·n_i: one threshold per feature, a JumpReLU
            p.kind, p.threshold = "jumprelu", (p.threshold.to(f64).clamp_min(0) * scale).float()
            meta.setdefault("source", {})["folded_into"] = "jumprelu (a global threshold times each decoder norm)"
    if cls is None or p.kind != kind:  # a fold may make it another architecture (BatchTopK's θ·n_i: a JumpReLU)
        cls = registry.get(p.kind)
    chosen = restore if isinstance(restore, dict) and restore and cls.architecture == restore_for else {}
    chosen = check_arguments(cls, chosen, f"{where}: its recorded circuitsae config", partial=True)
    try:
        sae = cls.from_parts(p, chosen)
    except CircuitSAEError as e:
        raise CircuitSAEError(f"{where}: {e}") from None
    sae.meta = meta
    return sae


def _scaled_note(n: "Tensor") -> dict[str, Any]:
    return {
        "min": float(n.min()),
        "max": float(n.max()),
        "meaning": "code i is the source file's code i times its decoder row's norm (rows folded to unit norm)",
    }


__all__ = [
    "FORMAT",
    "FORMATS",
    "NORM_TOLERANCE",
    "Parts",
    "build",
    "check_tensors",
    "detect_format",
    "f32",
    "load_safetensors",
    "looks_like_dictionary",
    "positive_int",
    "read_json",
]
