r"""Other libraries' SAE folders: detect, read, write, refuse.

:func:`circuitsae.dictionaries.load_dictionary` asks :func:`detect_format` what a folder is and
:func:`read_foreign` reads the three peers' folders into the circuitsae class that computes the same
codes; :func:`write_saelens` (``dictionary.save(path, format="saelens")``) writes a SAE Lens v6 folder
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

Sites. Hook names map to circuitsae sites only where they name the same tensor
(:mod:`circuitsae.sites`: ``resid.L`` is block L's output, ``mlp.L``/``attn.L`` what its MLP/attention
adds to the residual)::

    blocks.L.hook_resid_post                       -> resid.L     SAE Lens (TransformerLens names)
    blocks.L.hook_resid_pre, L >= 1                -> resid.(L-1) the same tensor (L = 0 is the embeddings)
    blocks.L.hook_mlp_out, blocks.L.hook_attn_out  -> mlp.L, attn.L  (after Gemma's post-norms, as circuitsae)
    model.layers.L, transformer.h.L,               -> resid.L     HF module paths (SAE Lens on an HF model);
      gpt_neox.layers.L; layers.L, h.L                            sparsify's, relative to base_model
    <blocks>.L.mlp / .self_attn / .attn /          -> mlp.L, attn.L  only when the model name tells a family
      .attention / .post_feedforward_layernorm /                  in which that module is the site (Gemma's
      .post_attention_layernorm                                   mlp is not mlp.L; its post-norm is)
    d_l submodule_name resid_{out,post}_layer{_}L  -> resid.L     with buffer io "out" and a matching layer;
      mlp_out_layerL, attn_out_layerL              -> mlp.L, attn.L  for a named non-Gemma model only

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

Written (SAE Lens v6): ``cfg.json`` with ``architecture``, ``d_in``, ``d_sae``, ``dtype: float32``,
``device: cpu``, ``apply_b_dec_to_input: true``, ``normalize_activations: none``,
``reshape_activations: none`` (topk: ``k``, ``rescale_acts_by_decoder_norm: false``: the rows are unit),
``metadata`` (``model_name``, ``hook_name`` from the site, ``context_size``, ``sae_lens_version:
"6.0.0"`` — the config layout it follows, which SAE Lens reads to choose v6 over the flat loader — and
``circuitsae``: the class, its constructor arguments and ``meta``, so a round trip restores them). ReLU
→ ``standard``, Gated → ``gated`` (or ``jumprelu`` via :meth:`GatedSAE.to_jumprelu`), TopK → ``topk``,
BatchTopK → ``jumprelu`` with its global θ broadcast, JumpReLU → ``jumprelu`` (θ = exp(log θ)); PCA and
the identity have no SAE Lens architecture and are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from circuitsae.dictionaries.base import FORMAT, Dictionary, _json_default
from circuitsae.dictionaries.batchtopk import BatchTopKSAE
from circuitsae.dictionaries.gated import GatedSAE
from circuitsae.dictionaries.jumprelu import JumpReLUSAE
from circuitsae.dictionaries.relu import ReluSAE
from circuitsae.dictionaries.topk import TopKSAE
from circuitsae.errors import CircuitSAEError

if TYPE_CHECKING:
    from torch import Tensor

FORMATS = ("circuitsae", "saelens", "dictionary_learning", "sparsify")
#: decoder rows whose norms are within this of 1 are unit already (float32 normalisation leaves ~1e-7)
NORM_TOLERANCE = 1e-5
#: the SAE Lens config layout written (SAE Lens reads ``metadata.sae_lens_version`` < 6 as a flat config)
SAELENS_LAYOUT_VERSION = "6.0.0"
SAELENS_ARCHITECTURES = ("standard", "gated", "jumprelu", "topk")
_DL_CLASSES = (
    "AutoEncoder",
    "AutoEncoderNew",
    "GatedAutoEncoder",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "JumpReluAutoEncoder",
)


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
    cfg = _read_json(cfg_path)
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


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CircuitSAEError(f"{p} is not valid JSON ({e})") from None


def read_foreign(path: "str | Path", fmt: "str | None" = None) -> Dictionary:
    """Read a SAE Lens, dictionary_learning or sparsify folder (``fmt`` as :func:`detect_format` says)."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    readers = {"saelens": read_saelens, "dictionary_learning": read_dictionary_learning, "sparsify": read_sparsify}
    if fmt not in readers:
        raise CircuitSAEError(f"{path}: {fmt!r} is not another library's format (known: {', '.join(readers)})")
    return readers[fmt](path)


# -- the weights every reader produces ---------------------------------------------------------------------
@dataclass
class _Parts:
    """One SAE in circuitsae's orientation (rows are features), float32, before folding (folds run in float64)."""

    kind: str  # relu | gated | jumprelu | topk | batchtopk
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


def _check_tensors(where: str, tensors: dict[str, "Tensor"], expected: dict[str, tuple], what: str) -> None:
    """Missing, unexpected and mis-shaped tensors, NaN/inf: one sentence each."""
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CircuitSAEError(
            f"{where} does not hold a {what}: missing {missing}, unexpected {extra} (expected {sorted(expected)})"
        )
    for k, shape in expected.items():
        got = tuple(tensors[k].shape)
        if got != tuple(shape):
            hint = " (transposed?)" if len(got) == 2 and got == tuple(shape)[::-1] else ""
            raise CircuitSAEError(f"{where}: {k} has shape {got} but a {what} of these sizes has {tuple(shape)}{hint}")
        t = tensors[k]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CircuitSAEError(f"{where}: {k} holds NaN or inf")


def _load_safetensors(p: Path) -> dict[str, "Tensor"]:
    try:
        return safetensors.torch.load_file(p)
    except Exception as e:  # safetensors raises several types for a bad header
        raise CircuitSAEError(f"{p} is not a readable safetensors file ({e})") from None


def _positive_int(cfg: dict, key: str, where: str) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 1:
        raise CircuitSAEError(f"{where}: {key!r} must be a positive integer, got {v!r}")
    return int(v)


def _f32(t: "Tensor") -> "Tensor":
    return t.detach().to("cpu", torch.float32)


def _log_threshold(theta: "Tensor") -> "Tensor":
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


@torch.no_grad()
def _build(p: _Parts, where: str, meta: dict[str, Any], restore: "dict | None" = None) -> Dictionary:
    """Fold b_dec and the decoder norms, then fill the circuitsae class (module docstring: decoder norms)."""
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
    restore = restore or {}
    f32 = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
    d, m = p.d, p.d_sae
    if p.kind == "relu":
        tied = bool(restore.get("tied")) and torch.equal(f32["W_enc"], f32["W_dec"])
        decoder_bias = restore.get("decoder_bias") is not False or bool(f32["b_dec"].any())
        sae: Dictionary = ReluSAE(d, m, tied=tied, decoder_bias=decoder_bias)
        if not tied:
            sae.W_enc_untied.copy_(f32["W_enc"])
        sae.b_enc.copy_(f32["b_enc"])
    elif p.kind == "gated":
        sae = GatedSAE(d, m)
        for name in ("b_gate", "r_mag", "b_mag"):
            getattr(sae, name).copy_(f32[name])
        sae.W_gate.copy_(f32["W_enc"])
    elif p.kind == "jumprelu":
        sae = JumpReLUSAE(d, m, bandwidth=restore.get("bandwidth"))
        sae.log_threshold.copy_(_log_threshold(f32["threshold"]))
    elif p.kind in ("topk", "batchtopk"):
        if not isinstance(p.k, int) or not 1 <= p.k <= m:
            raise CircuitSAEError(f"{where}: k must be an integer in [1, d_sae={m}], got {p.k!r}")
        cls = TopKSAE if p.kind == "topk" else BatchTopKSAE
        sae = cls(d, m, p.k, k_aux=restore.get("k_aux"))
        if p.kind == "batchtopk":
            sae.threshold.copy_(f32["threshold"].reshape(()))
            sae.threshold_steps.fill_(1 if float(p.threshold) >= 0 else 0)  # dictionary_learning's −1: not yet set
    else:  # pragma: no cover - readers only produce the kinds above
        raise CircuitSAEError(f"{where}: no circuitsae class for {p.kind!r}")
    if isinstance(sae, (JumpReLUSAE, TopKSAE)):
        sae.W_enc.copy_(f32["W_enc"])
        sae.b_enc.copy_(f32["b_enc"])
    sae.W_dec.copy_(f32["W_dec"])
    if sae.b_dec is not None:
        sae.b_dec.copy_(f32["b_dec"])
    sae.meta = meta
    return sae


def _scaled_note(n: "Tensor") -> dict[str, Any]:
    return {
        "min": float(n.min()),
        "max": float(n.max()),
        "meaning": "code i is the source file's code i times its decoder row's norm (rows folded to unit norm)",
    }


# -- sites ---------------------------------------------------------------------------------------------
_TL_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_mlp_out|hook_attn_out)$")
_TL_KIND = {"hook_resid_post": "resid", "hook_mlp_out": "mlp", "hook_attn_out": "attn"}
_SITE_TO_TL = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
#: substrings of a model name -> the circuitsae families (sites.ARCHITECTURES keys) it can be
_FAMILY_HINTS = (
    ("gemma-3", ("gemma3_text",)),
    ("gemma3", ("gemma3_text",)),
    ("gemma-2", ("gemma2",)),
    ("gemma2", ("gemma2",)),
    ("gemma", ("gemma2", "gemma3_text")),
    ("gpt2", ("gpt2",)),
    ("gpt-2", ("gpt2",)),
    ("pythia", ("gpt_neox",)),
    ("neox", ("gpt_neox",)),
    ("qwen", ("qwen2",)),
    ("mistral", ("mistral",)),
    ("llama", ("llama",)),
    ("smollm", ("llama",)),
)


def _families(model: "str | None") -> "tuple[str, ...] | None":
    """The families a model name says (None: unknown, any)."""
    name = (model or "").lower()
    for key, fams in _FAMILY_HINTS:
        if key in name:
            return fams
    return None


def transformer_lens_site(hook: str) -> "str | None":
    """The circuitsae site a TransformerLens hook name is, or None (table in the module docstring)."""
    m = _TL_HOOK.match(hook or "")
    if not m:
        return None
    layer, name = int(m.group(1)), m.group(2)
    if name == "hook_resid_pre":  # block L's input is block L−1's output; L = 0 reads the embeddings
        return f"resid.{layer - 1}" if layer >= 1 else None
    return f"{_TL_KIND[name]}.{layer}"


def module_site(name: str, model: "str | None" = None, relative: bool = False) -> "str | None":
    """The site a Hugging Face module path is (``relative``: to ``base_model``, as sparsify names them).

    A block's output is ``resid.L`` in every family; a sub-module is ``mlp.L``/``attn.L`` only if every
    family the model name allows says so (Gemma's ``mlp`` is not ``mlp.L``, Llama's
    ``post_attention_layernorm`` is not ``attn.L``).
    """
    from circuitsae.sites import ARCHITECTURES

    fams = _families(model) or tuple(ARCHITECTURES)
    found: set = set()
    for fam in fams:
        lay = ARCHITECTURES[fam]
        blocks = lay.blocks.split(".", 1)[1] if relative else lay.blocks
        m = re.fullmatch(re.escape(blocks) + r"\.(\d+)(?:\.(\w+))?", name or "")
        if not m:
            continue
        layer, attr = int(m.group(1)), m.group(2)
        kind = "resid" if attr is None else "attn" if attr == lay.attn else "mlp" if attr == lay.mlp else None
        found.add(f"{kind}.{layer}" if kind else None)
    return found.pop() if len(found) == 1 else None


_DL_SUBMODULE = re.compile(r"^(resid|mlp|attn)_(?:out|post)_layer_?(\d+)$")


def dictionary_learning_site(submodule: "str | None", model: "str | None", layer: Any, io: Any) -> "str | None":
    """The site a dictionary_learning ``submodule_name`` names (table in the module docstring)."""
    m = _DL_SUBMODULE.match(submodule or "")
    if not m or io not in (None, "out"):
        return None
    kind, n = m.group(1), int(m.group(2))
    if layer is not None and layer != n:
        return None
    if kind != "resid":
        fams = _families(model)
        if fams is None or any(f.startswith("gemma") for f in fams):
            return None
    return f"{kind}.{n}"


def site_to_hook(site: str) -> str:
    """The TransformerLens hook name of a circuitsae site (what SAE Lens's ``hook_name`` holds)."""
    from circuitsae.sites import Site

    s = Site.parse(site)
    return f"blocks.{s.layer}.{_SITE_TO_TL[s.kind]}"


# -- SAE Lens ------------------------------------------------------------------------------------------
_SAELENS_META = (
    "model_name",
    "hook_name",
    "hook_head_index",
    "model_class_name",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "neuronpedia_id",
    "sae_lens_version",
    "sae_lens_training_version",
)


def _major(version: Any) -> int:
    m = re.match(r"\s*(\d+)", str(version or ""))
    return int(m.group(1)) if m else 0


def _saelens_cfg(cfg: dict, where: str) -> tuple[dict, dict]:
    """(settings, metadata) of a v6 nested or a pre-6 flat SAE Lens config, as SAE Lens 6 normalises them."""
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if _major(version) >= 6:
        meta = cfg.get("metadata") or {}
        if not isinstance(meta, dict):
            raise CircuitSAEError(f"{where}: 'metadata' must be an object")
        return dict(cfg), dict(meta)
    renames = {
        "hook_point": "hook_name",
        "hook_point_head_index": "hook_head_index",
        "activation_fn_str": "activation_fn",
    }
    c = {renames.get(k, k): v for k, v in cfg.items()}
    c.setdefault("apply_b_dec_to_input", True)
    c.setdefault("architecture", "standard")
    c.setdefault("reshape_activations", "hook_z" if "hook_z" in str(c.get("hook_name", "")) else "none")
    act = c.get("activation_fn") or "relu"
    if act == "topk":
        k = (c.get("activation_fn_kwargs") or {}).get("k")
        if k is None:
            raise CircuitSAEError(f"{where}: activation_fn 'topk' without activation_fn_kwargs.k")
        c["architecture"], c["k"] = "topk", k
    elif act != "relu":
        raise CircuitSAEError(f"{where}: activation_fn {act!r} is not supported (relu and topk are)")
    norm = c.get("normalize_activations")
    c["normalize_activations"] = "none" if not norm else "expected_average_only_in" if norm is True else norm
    return c, {k: c[k] for k in _SAELENS_META if k in c}


def read_saelens(path: "str | Path") -> Dictionary:
    """A SAE Lens folder (v6 or older flat config) as the circuitsae class computing the same codes."""
    path = Path(path)
    cfg_path, weights = path / "cfg.json", path / "sae_weights.safetensors"
    raw = _read_json(cfg_path)
    if not isinstance(raw, dict):
        raise CircuitSAEError(f"{cfg_path} is not a SAE Lens config (a JSON object expected)")
    c, smeta = _saelens_cfg(raw, str(cfg_path))
    arch = c.get("architecture")
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        raise CircuitSAEError(
            f"{cfg_path}: architecture {arch!r} is SAE Lens's training form (its threshold is a training "
            "buffer); save it with save_inference_model, which writes it as jumprelu"
        )
    if arch not in SAELENS_ARCHITECTURES:
        kind = (
            " (a transcoder maps one site to another; a dictionary reconstructs its input)"
            if "transcoder" in str(arch)
            else ""
        )
        raise CircuitSAEError(
            f"{cfg_path}: SAE Lens architecture {arch!r} is not supported{kind} "
            f"(supported: {', '.join(SAELENS_ARCHITECTURES)})"
        )
    d, m = _positive_int(c, "d_in", str(cfg_path)), _positive_int(c, "d_sae", str(cfg_path))
    norm = c.get("normalize_activations", "none")
    if norm != "none":
        why = {
            "expected_average_only_in": "its scaling factor is not in the folder (fold it first with SAE Lens's "
            "fold_activation_norm_scaling_factor, which sets 'none')",
            "constant_norm_rescale": "it rescales every token to norm √d_in, which no dictionary here can hold",
            "layer_norm": "it layer-normalises every token, which no dictionary here can hold",
            "covariance_whitening": "the whitening statistics are not in the folder (SAE Lens's trainer folds them "
            "before saving)",
        }.get(norm, "only 'none' is")
        raise CircuitSAEError(f"{cfg_path}: normalize_activations={norm!r} is not supported: {why}")
    if c.get("reshape_activations", "none") != "none":
        raise CircuitSAEError(
            f"{cfg_path}: reshape_activations={c['reshape_activations']!r} is not supported (a dictionary here "
            "reads one site's [d] vector, not per-head hook_z activations)"
        )
    if c.get("finetuning_scaling_factor"):
        raise CircuitSAEError(f"{cfg_path}: a finetuning_scaling_factor is not supported (SAE Lens 6 drops it too)")
    tensors = _load_safetensors(weights)
    sf = tensors.pop("scaling_factor", None)
    if sf is not None and not bool((sf == 1).all()):
        raise CircuitSAEError(
            f"{weights}: a scaling_factor other than 1 (a finetuning scaling factor) is not supported"
        )
    if arch == "jumprelu" and "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()  # older SAE Lens checkpoints, as SAE Lens converts
    shapes = {"W_enc": (d, m), "W_dec": (m, d), "b_dec": (d,)}
    shapes |= {"b_gate": (m,), "r_mag": (m,), "b_mag": (m,)} if arch == "gated" else {"b_enc": (m,)}
    if arch == "jumprelu":
        shapes["threshold"] = (m,)
    _check_tensors(str(weights), tensors, shapes, f"SAE Lens {arch} SAE (d_in={d}, d_sae={m})")
    t = {k: _f32(v) for k, v in tensors.items()}
    # SAE Lens stores W_enc [d_in, d_sae] (x @ W_enc) and W_dec [d_sae, d_in]; when d_in == d_sae the shapes
    # cannot tell a transposed W_enc, and SAE Lens's convention is taken.
    kind = {"standard": "relu", "gated": "gated", "jumprelu": "jumprelu", "topk": "topk"}[arch]
    parts = _Parts(
        kind,
        d,
        m,
        W_enc=t["W_enc"].T,
        W_dec=t["W_dec"],
        b_dec=t["b_dec"],
        b_enc=t.get("b_enc"),
        b_gate=t.get("b_gate"),
        r_mag=t.get("r_mag"),
        b_mag=t.get("b_mag"),
        threshold=t.get("threshold"),
        centred=bool(c.get("apply_b_dec_to_input", True)),
    )
    if arch == "topk":
        parts.k = _positive_int(c, "k", str(cfg_path))
        parts.rescale = bool(c.get("rescale_acts_by_decoder_norm", False))
    ours = smeta.get("circuitsae") if isinstance(smeta.get("circuitsae"), dict) else {}
    stored = dict(raw)  # the file's config, less circuitsae's own block (restored into meta below)
    if isinstance(raw.get("metadata"), dict):
        stored["metadata"] = {k: v for k, v in raw["metadata"].items() if k != "circuitsae"}
    meta: dict[str, Any] = dict(ours.get("meta") or {}) if isinstance(ours.get("meta"), dict) else {}
    meta.pop("codes_scaled_by_decoder_norm", None)
    source: dict[str, Any] = {"format": "saelens", "path": str(path), "architecture": arch, "cfg": stored}
    if smeta.get("model_name"):
        meta["model"] = smeta["model_name"]
    hook = smeta.get("hook_name")
    if hook:
        source["hook_name"] = hook
        site = None
        kwargs = smeta.get("model_from_pretrained_kwargs") or {}
        if smeta.get("hook_head_index") is None and not (
            isinstance(kwargs, dict) and kwargs.get("center_writing_weights")
        ):
            site = transformer_lens_site(hook) or module_site(hook, smeta.get("model_name"))
        if site:
            meta["site"] = site
        else:
            meta.pop("site", None)  # a site restored from circuitsae's block must agree with the hook
            source["unmapped_hook"] = hook
    if smeta.get("context_size") is not None:
        meta["context_size"] = smeta["context_size"]
    meta["source"] = source
    restore = (ours.get("config") or {}) if ours.get("architecture") == kind else {}
    return _build(parts, str(weights), meta, restore)


def write_saelens(dictionary: Dictionary, path: "str | Path", architecture: "str | None" = None) -> Path:
    """Write ``dictionary`` as a SAE Lens v6 folder (``cfg.json`` + ``sae_weights.safetensors``) that SAE Lens loads.

    ``architecture`` chooses among the forms the dictionary can take (a Gated SAE: ``gated`` or
    ``jumprelu``); by default its own.
    """
    from circuitsae.io import atomic_write

    d = dictionary
    own = d.architecture
    possible = {
        "relu": ("standard",),
        "gated": ("gated", "jumprelu"),
        "topk": ("topk",),
        "batchtopk": ("jumprelu",),
        "jumprelu": ("jumprelu",),
    }.get(own)
    if possible is None:
        what = {"pca": "a rotation onto principal components", "identity": "the activations themselves"}.get(
            own, "this kind"
        )
        raise CircuitSAEError(
            f"a {own} dictionary cannot be saved in SAE Lens format: SAE Lens has no architecture for {what}"
        )
    arch = architecture or possible[0]
    if arch not in possible:
        raise CircuitSAEError(
            f"a {own} dictionary cannot be saved as SAE Lens {arch!r} (it can be: {', '.join(possible)})"
        )
    exported = d.to_jumprelu() if isinstance(d, GatedSAE) and arch == "jumprelu" else d
    with torch.no_grad():
        W_dec = exported.W_dec.detach().float().cpu()
        b_dec = exported.b_dec.detach().float().cpu() if exported.b_dec is not None else torch.zeros(d.d)
        if isinstance(exported, GatedSAE):
            tensors = {
                "W_enc": exported.W_gate.detach().float().cpu().T,
                "b_gate": exported.b_gate.detach().float().cpu(),
                "r_mag": exported.r_mag.detach().float().cpu(),
                "b_mag": exported.b_mag.detach().float().cpu(),
            }
        else:
            tensors = {"W_enc": exported.W_enc.detach().float().cpu().T, "b_enc": exported.b_enc.detach().float().cpu()}
        if isinstance(exported, BatchTopKSAE):  # the global θ, one per feature (SAE Lens's own export)
            tensors["threshold"] = exported.threshold.detach().float().cpu().expand(d.d_dict)
        elif isinstance(exported, JumpReLUSAE):
            tensors["threshold"] = exported.log_threshold.detach().float().cpu().exp()
        tensors |= {"W_dec": W_dec, "b_dec": b_dec}
        tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": d.d,
        "d_sae": d.d_dict,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if arch == "topk":
        cfg |= {"k": int(d.k), "rescale_acts_by_decoder_norm": False}  # rows are unit: nothing to rescale
    meta = dict(d.meta)
    metadata: dict[str, Any] = {"sae_lens_version": SAELENS_LAYOUT_VERSION}
    if meta.get("model"):
        metadata["model_name"] = meta["model"]
    if meta.get("site"):
        metadata["hook_name"] = site_to_hook(meta["site"])
    elif isinstance(meta.get("source"), dict) and meta["source"].get("hook_name"):
        metadata["hook_name"] = meta["source"]["hook_name"]
    if meta.get("context_size") is not None:
        metadata["context_size"] = meta["context_size"]
    from circuitsae import __version__

    ours_meta = {**meta, "exported_from": own} if own != ("relu" if arch == "standard" else arch) else meta
    metadata["circuitsae"] = {
        "version": __version__,
        "architecture": exported.architecture,
        "config": exported.config(),
        "meta": ours_meta,
    }
    cfg["metadata"] = metadata
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "sae_weights.safetensors", safetensors.torch.save(tensors))
    atomic_write(path / "cfg.json", json.dumps(cfg, indent=1, default=_json_default).encode())
    return path


# -- dictionary_learning -------------------------------------------------------------------------------
def read_dictionary_learning(path: "str | Path") -> Dictionary:
    """A dictionary_learning folder (``ae.pt`` + ``config.json``) as the circuitsae class computing the same codes."""
    path = Path(path)
    ae, cfg_path = path / "ae.pt", path / "config.json"
    if not cfg_path.is_file():
        raise CircuitSAEError(
            f"{path} has ae.pt but no config.json, whose trainer.dict_class names the class "
            "(AutoEncoderTopK and BatchTopKSAE hold the same keys and compute different codes)"
        )
    config = _read_json(cfg_path)
    trainer = config.get("trainer") if isinstance(config, dict) else None
    if not isinstance(trainer, dict) or "dict_class" not in trainer:
        raise CircuitSAEError(f"{cfg_path} lacks trainer.dict_class (a dictionary_learning config.json has it)")
    cls = trainer["dict_class"]
    if cls not in _DL_CLASSES:
        raise CircuitSAEError(
            f"{cfg_path}: dictionary_learning class {cls!r} is not supported (supported: {', '.join(_DL_CLASSES)})"
        )
    d, m = _positive_int(trainer, "activation_dim", str(cfg_path)), _positive_int(trainer, "dict_size", str(cfg_path))
    try:
        sd = torch.load(ae, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors of several types; weights_only refuses arbitrary objects
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CircuitSAEError(f"{ae} is not a state dict torch.load(weights_only=True) can read ({first})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CircuitSAEError(f"{ae} is not a state dict of tensors")
    what = f"dictionary_learning {cls} (activation_dim={d}, dict_size={m})"
    linear = {"encoder.weight": (m, d), "decoder.weight": (d, m)}  # nn.Linear stores [out, in]
    raw_params = {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d), "b_dec": (d,)}
    shapes = {
        "AutoEncoder": linear | {"encoder.bias": (m,), "bias": (d,)},
        "AutoEncoderNew": linear | {"encoder.bias": (m,), "decoder.bias": (d,)},
        "GatedAutoEncoder": linear | {"decoder_bias": (d,), "r_mag": (m,), "gate_bias": (m,), "mag_bias": (m,)},
        "AutoEncoderTopK": linear | {"encoder.bias": (m,), "b_dec": (d,), "k": (), "threshold": ()},
        "BatchTopKSAE": linear | {"encoder.bias": (m,), "b_dec": (d,), "k": (), "threshold": ()},
        "MatryoshkaBatchTopKSAE": raw_params
        | {"k": (), "threshold": (), "group_sizes": tuple(sd["group_sizes"].shape) if "group_sizes" in sd else (1,)},
        "JumpReluAutoEncoder": raw_params | {"threshold": (m,)},
    }[cls]
    _check_tensors(str(ae), sd, shapes, what)
    t = {k: _f32(v) for k, v in sd.items()}
    # encoder.weight [d_sae, d_in] and decoder.weight [d_in, d_sae] (nn.Linear), W_enc [d_in, d_sae] and W_dec
    # [d_sae, d_in] (raw parameters); when d_in == d_sae those conventions are taken.
    if "encoder.weight" in t:
        W_enc, W_dec = t["encoder.weight"], t["decoder.weight"].T
    else:
        W_enc, W_dec = t["W_enc"].T, t["W_dec"]
    buffers: dict[str, Any] = {}
    k = None
    if "k" in sd:
        k = int(sd["k"])
        buffers["k"] = k
        if trainer.get("k") is not None and trainer["k"] != k:
            raise CircuitSAEError(f"{path}: config.json says k={trainer['k']} but ae.pt's k buffer holds {k}")
    if "threshold" in sd and sd["threshold"].ndim == 0:
        buffers["threshold"] = float(sd["threshold"])
    if cls == "MatryoshkaBatchTopKSAE":
        buffers["group_sizes"] = sd["group_sizes"].tolist()
        if sum(buffers["group_sizes"]) != m:
            raise CircuitSAEError(f"{ae}: group_sizes sum to {sum(buffers['group_sizes'])}, not dict_size={m}")
    kind = {
        "AutoEncoder": "relu",
        "AutoEncoderNew": "relu",
        "GatedAutoEncoder": "gated",
        "AutoEncoderTopK": "topk",
        "BatchTopKSAE": "batchtopk",
        "MatryoshkaBatchTopKSAE": "batchtopk",
        "JumpReluAutoEncoder": "jumprelu",
    }[cls]
    parts = _Parts(kind, d, m, W_enc=W_enc, W_dec=W_dec, b_dec=torch.zeros(d), k=k)
    if cls == "AutoEncoder":
        parts.b_enc, parts.b_dec = t["encoder.bias"], t["bias"]
    elif cls == "AutoEncoderNew":  # ReLU(W x + b), x̂ = decoder(f) + decoder.bias: the encoder reads x itself
        parts.b_enc, parts.b_dec, parts.centred = t["encoder.bias"], t["decoder.bias"], False
    elif cls == "GatedAutoEncoder":
        parts.b_dec, parts.b_gate, parts.r_mag, parts.b_mag = (
            t["decoder_bias"],
            t["gate_bias"],
            t["r_mag"],
            t["mag_bias"],
        )
    elif cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        parts.b_enc, parts.b_dec = t["encoder.bias"], t["b_dec"]
        if kind == "batchtopk":
            parts.threshold = t["threshold"]
    else:  # raw parameters: Matryoshka (x − b_dec) @ W_enc; JumpReLU x @ W_enc (apply_b_dec_to_input False)
        parts.b_enc, parts.b_dec = t["b_enc"], t["b_dec"]
        parts.threshold = t["threshold"]
        parts.centred = cls != "JumpReluAutoEncoder"
    buffer = config.get("buffer") if isinstance(config.get("buffer"), dict) else {}
    meta: dict[str, Any] = {}
    if trainer.get("lm_name"):
        meta["model"] = trainer["lm_name"]
    site = dictionary_learning_site(
        trainer.get("submodule_name"), trainer.get("lm_name"), trainer.get("layer"), buffer.get("io")
    )
    if site:
        meta["site"] = site
    if buffer.get("ctx_len") is not None:
        meta["context_size"] = buffer["ctx_len"]
    meta["source"] = {"format": "dictionary_learning", "path": str(path), "dict_class": cls, "config": config}
    if buffers:
        meta["source"]["buffers"] = buffers
    return _build(parts, str(ae), meta)


# -- sparsify ------------------------------------------------------------------------------------------
def read_sparsify(path: "str | Path") -> Dictionary:
    """A sparsify folder (``cfg.json`` + ``sae.safetensors``; a run's hookpoint subfolder) as a TopK SAE."""
    path = Path(path)
    cfg_path, weights = path / "cfg.json", path / "sae.safetensors"
    cfg = _read_json(cfg_path)
    where = str(cfg_path)
    if not isinstance(cfg, dict):
        raise CircuitSAEError(f"{where} is not a sparsify config (a JSON object expected)")
    if cfg.get("transcode"):
        raise CircuitSAEError(f"{where}: a sparsify transcoder (transcode: true) maps a module's input to its output; "
                              "a dictionary reconstructs its input")  # fmt: skip
    if cfg.get("skip_connection"):
        raise CircuitSAEError(f"{where}: a sparsify coder with a skip connection (W_skip) is not supported")
    if cfg.get("activation", "topk") != "topk":
        raise CircuitSAEError(f"{where}: sparsify activation {cfg.get('activation')!r} is not supported (topk is)")
    if cfg.get("signed"):
        raise CircuitSAEError(f"{where}: a signed sparsify TopK (signed: true) is not supported")
    d, k = _positive_int(cfg, "d_in", where), _positive_int(cfg, "k", where)
    m = int(cfg.get("num_latents") or 0) or d * _positive_int(cfg, "expansion_factor", where)
    tensors = _load_safetensors(weights)
    if "W_skip" in tensors:
        raise CircuitSAEError(f"{weights}: a sparsify coder with a skip connection (W_skip) is not supported")
    # encoder.weight [d_sae, d_in] (nn.Linear) and W_dec [d_sae, d_in]; when d_in == d_sae that convention holds
    shapes = {"encoder.weight": (m, d), "encoder.bias": (m,), "W_dec": (m, d), "b_dec": (d,)}
    _check_tensors(str(weights), tensors, shapes, f"sparsify TopK coder (d_in={d}, num_latents={m})")
    t = {k_: _f32(v) for k_, v in tensors.items()}
    parts = _Parts(
        "topk", d, m, W_enc=t["encoder.weight"], W_dec=t["W_dec"], b_dec=t["b_dec"], b_enc=t["encoder.bias"], k=k
    )
    hookpoint, run = path.name, path.parent
    if re.fullmatch(r"seed\d+", hookpoint):  # several seeds: <run>/<hookpoint>/seedN
        hookpoint, run = run.name, run.parent
    run_cfg = _read_json(run / "config.json") if (run / "config.json").is_file() else {}
    run_cfg = run_cfg if isinstance(run_cfg, dict) else {}
    meta: dict[str, Any] = {}
    if run_cfg.get("model"):
        meta["model"] = run_cfg["model"]
    site = module_site(hookpoint, run_cfg.get("model"), relative=True)
    if site:
        meta["site"] = site
    if run_cfg.get("ctx_len") is not None:
        meta["context_size"] = run_cfg["ctx_len"]
    meta["source"] = {"format": "sparsify", "path": str(path), "hookpoint": hookpoint, "cfg": cfg}
    if run_cfg:
        meta["source"]["run_config"] = run_cfg
    if not site:
        meta["source"]["unmapped_hook"] = hookpoint
    return _build(parts, str(weights), meta)


__all__ = [
    "FORMAT",
    "FORMATS",
    "NORM_TOLERANCE",
    "detect_format",
    "dictionary_learning_site",
    "module_site",
    "read_dictionary_learning",
    "read_foreign",
    "read_saelens",
    "read_sparsify",
    "site_to_hook",
    "transformer_lens_site",
    "write_saelens",
]
