"""Feature-level activation patching (Cunningham et al. §4; REFERENCE §4).

Run the *target* (counterfactual) prompts and keep their codes c̄ at a site;
run the *base* prompts, encode their activations to codes c, and replace the
activation at every position i by

    x'_i = x_i + Σ_{j∈F} (c̄_ij − c_ij) f_j

(f_j the decoder row of feature j). The base run's reconstruction error stays,
since x' starts from x: patching no feature gives the base run back exactly,
and patching every feature of a lossless dictionary (PCA, identity) gives the
target's activation, hence the target run. The metrics are read at each
prompt's final token: D_KL(z ‖ y) (patched ‖ target, the paper's direction),
D_KL(y ‖ z) beside it, and the mean edit size ‖x' − x‖₂ over prompts and
positions.

The maths of an edit is done in the dictionary's dtype (float32, usually) and the edit is
cast to the model's dtype where it is added, so a bfloat16 model and a float32
dictionary work together; KLs are computed from logits widened to float32.

:func:`patch_features` is the readable, nnsight-based API (any model, any site,
several sites at once). :class:`FeatureDeltas` holds the per-position code
differences of one site that the fast ACDC machinery in :mod:`circuitsae.circuits.acdc`
works from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from circuitsae import sites as sites_mod
from circuitsae.dictionaries import Dictionary
from circuitsae.errors import CircuitSAEError, NothingToPatch
from circuitsae.interventions.splice import check_dictionary, default_start, logits_of
from circuitsae.metrics import kl_divergence, wide
from circuitsae.models import input_device

Features = "Iterable[int] | str | None"


@dataclass
class PatchResult:
    """What one patched run gives, all at each prompt's final token.

    ``kl`` is the mean over prompts of D_KL(z ‖ y), ``kl_reverse`` of D_KL(y ‖ z);
    ``edit_magnitude`` is the mean of ‖x' − x‖₂ over prompts and patched positions
    (over sites too when several are patched; ``edit_by_site`` splits it).
    """

    logits: torch.Tensor  # [N, V] patched run, z
    target_logits: torch.Tensor  # [N, V] target run, y
    base_logits: torch.Tensor  # [N, V] unpatched base run
    kl: float
    kl_reverse: float
    kl_per_prompt: torch.Tensor  # [N]
    edit_magnitude: float
    edit_by_site: dict[str, float]


def _as_ids(ids: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(ids)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.dtype not in (torch.int64, torch.int32):
        raise CircuitSAEError(f"{name} must be token ids of shape [N, T], got {tuple(t.shape)} {t.dtype}")
    return t.long()


def _trailing(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[N] length of each row once its trailing run of ``pad_id`` is cut off."""
    not_pad = (ids != pad_id).flip(1).long()
    return ids.shape[1] - (not_pad.cumsum(1) == 0).sum(1)


def pad_id(model: Any) -> "int | None":
    """The padding token id of the model's tokenizer (None when it has none)."""
    tok = getattr(model, "tokenizer", None)
    return getattr(tok, "pad_token_id", None)


def check_pair(
    base: torch.Tensor,
    target: torch.Tensor,
    lengths: "torch.Tensor | None",
    target_lengths: "torch.Tensor | None" = None,
    pad: "int | None" = None,
) -> torch.Tensor:
    """Validate base/target token ids and return per-prompt lengths (one-line errors).

    Patching aligns base and target positions by index, so each base prompt and
    its target must have the same *real* length, not only the same padded
    shape. Real lengths are ``lengths`` (base) and ``target_lengths`` when given;
    with a padding id ``pad``, also each row with its trailing pad tokens cut
    off. Unequal real lengths are refused, naming the first such prompt.
    """
    if base.shape != target.shape:
        raise CircuitSAEError(
            f"base and target prompts must tokenise to the same length: shapes {tuple(base.shape)} and "
            f"{tuple(target.shape)}"
        )
    n, t = base.shape

    def valid(x: Any, name: str) -> torch.Tensor:
        x = torch.as_tensor(x).long().reshape(-1).cpu()
        if x.numel() != n or int(x.min()) < 1 or int(x.max()) > t:
            raise CircuitSAEError(f"{name} must be {n} integers in 1..{t}")
        return x

    full = torch.full((n,), t, dtype=torch.long, device="cpu")
    b_len = full if lengths is None else valid(lengths, "lengths")
    t_len = b_len if target_lengths is None else valid(target_lengths, "target_lengths")
    checks = [(b_len, t_len, "lengths")]
    if pad is not None:
        checks.append((_trailing(base.cpu(), pad), _trailing(target.cpu(), pad), "tokens before trailing padding"))
    for a, b, what in checks:
        differ = (a != b).nonzero().flatten()
        if differ.numel():
            i = int(differ[0])
            raise CircuitSAEError(
                f"base prompt {i} has {int(a[i])} real tokens and its target {int(b[i])} ({what}; "
                f"{differ.numel()} of {n} prompts differ): patching aligns positions by index, so each pair must "
                "have the same real length"
            )
    return b_len


def feature_index(dictionary: Dictionary, features: Features) -> torch.Tensor:
    """Feature ids as a LongTensor; ``"all"`` means every feature, ``None`` none."""
    if features is None:
        return torch.zeros(0, dtype=torch.long, device="cpu")
    if isinstance(features, str):
        if features != "all":
            raise CircuitSAEError(f"features must be a list of ids or 'all', got {features!r}")
        return torch.arange(dictionary.d_dict, device="cpu")
    idx = torch.as_tensor(list(features) if not torch.is_tensor(features) else features, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= dictionary.d_dict):
        raise CircuitSAEError(f"feature ids must lie in 0..{dictionary.d_dict - 1}")
    return idx


def position_mask(
    lengths: torch.Tensor, t: int, start: int, device: "torch.device | str | None" = None
) -> torch.Tensor:
    """[N, T] bool on ``device``: positions ``start <= i < length`` (the ones that are patched and measured)."""
    pos = torch.arange(t, device=device)[None]
    return (pos >= start) & (pos < lengths.to(device)[:, None])


def edit(dictionary: Dictionary, x: torch.Tensor, x_target: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Σ_{j∈F} (c̄_j − c_j) f_j for activations ``x`` (base) and ``x_target``, any leading shape.

    Codes come from the dictionary in its dtype; the sum is taken in the wider of that and float32 (float64
    for a float64 model, as :class:`FeatureDeltas` does), on the dictionary's device, and returned in ``x``'s
    dtype.
    """
    if features.numel() == 0:
        return torch.zeros_like(x)
    w, features = dictionary.W_dec, features.to(dictionary.W_dec.device)
    work = torch.promote_types(wide(x).dtype, w.dtype)
    dc = dictionary.encode(x_target.to(w.dtype))[..., features] - dictionary.encode(x.to(w.dtype))[..., features]
    return (dc.to(work) @ w[features].to(work)).to(x.dtype)


def _normalise(
    model: Any, dictionary: "Dictionary | Mapping[str, Dictionary]", site: "str | None", features: Any
) -> dict[str, tuple[Dictionary, torch.Tensor]]:
    if isinstance(dictionary, Dictionary):
        if site is None:
            raise CircuitSAEError("name the site the dictionary belongs to, e.g. site='resid.6'")
        dictionary, features = {str(site): dictionary}, {str(site): features}
    elif site is not None:
        raise CircuitSAEError("with a mapping {site: dictionary}, pass site=None and features as {site: ids}")
    if not isinstance(features, Mapping):
        features = {s: features for s in dictionary}
    unknown = set(features) - set(dictionary)
    if unknown:
        raise CircuitSAEError(f"features given for sites without a dictionary: {sorted(unknown)}")
    out = {}
    for s, d in dictionary.items():
        check_dictionary(model, s, d)
        out[str(sites_mod.Site.parse(s))] = (d, feature_index(d, features.get(s)))
    return out


def _final(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each prompt's final-token logits ``[N, V]``, widened to float32."""
    rows = torch.arange(len(lengths), device=logits.device)
    return wide(logits[rows, (lengths - 1).to(logits.device)])


@torch.no_grad()
def clean_run(model: Any, prompts: torch.Tensor, sites: "list[str]", lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """One clean run of ``prompts`` (target or base): each site's activation and the final-token logits
    (``"logits"``)."""
    saved = {}
    with model.trace(prompts.to(input_device(model))):
        for s in sites_mod.resolve(model, sites) if sites else []:
            saved[str(s)] = sites_mod.read(model, s).save()
        logits = logits_of(model).save()
    out = {s: v.detach() for s, v in saved.items()}
    out["logits"] = _final(logits, lengths)
    return out


@torch.no_grad()
def patched_run(
    model: Any,
    plan: Mapping[str, tuple[Dictionary, torch.Tensor]],
    base: torch.Tensor,
    target_acts: Mapping[str, torch.Tensor],
    lengths: torch.Tensor,
    start: "int | None" = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One base run with the features of ``plan`` patched in; returns final logits and per-site edit norms [N, T].

    Sites are patched in forward order within the one trace, so a later site's
    codes c are read from the already-patched run.
    """
    norms = {}
    t = base.shape[1]
    # masks and ids are made before the trace, on the devices of the tensors they meet inside it
    masks = {
        s: position_mask(lengths, t, default_start(d) if start is None else start, d.W_dec.device)
        for s, (d, _) in plan.items()
    }
    with model.trace(base.to(input_device(model))):
        for s in sites_mod.resolve(model, list(plan)):
            dictionary, features = plan[str(s)]
            first = default_start(dictionary) if start is None else start
            x = sites_mod.read(model, s)
            delta = edit(dictionary, x[:, first:], target_acts[str(s)][:, first:], features)
            delta = delta * masks[str(s)][:, first:, None].to(delta.dtype)
            x[:, first:] = x[:, first:] + delta
            norms[str(s)] = torch.nn.functional.pad(wide(delta).norm(dim=-1), (first, 0)).save()
        logits = logits_of(model).save()
    return _final(logits, lengths), {s: v.detach() for s, v in norms.items()}


@torch.no_grad()
def patch_features(
    model: Any,
    dictionary: "Dictionary | Mapping[str, Dictionary]",
    site: "str | None",
    base: Any,
    target: Any,
    features: Any,
    *,
    lengths: Any = None,
    target_lengths: Any = None,
    start: "int | None" = None,
) -> PatchResult:
    """Patch features of the target run into the base run (REFERENCE §4) and measure the effect.

    ``patch_features(model, sae, "resid.6", base_ids, target_ids, [12, 345])``;
    ``features="all"`` patches every feature, ``[]`` none. For several sites at
    once pass ``{site: dictionary}`` and ``site=None``; ``features`` is then
    ``{site: ids}`` (or one list/"all" for every site). ``lengths`` gives each
    prompt's real length when prompts are right-padded (the final token is
    ``lengths − 1``), ``target_lengths`` the targets' when they are not the
    same (they must be: pairs of unequal real length are refused, also when
    only the trailing padding shows it); ``start`` overrides the first patched position (default:
    the dictionary's ``first_position``, which skips the start token).
    """
    base, target = _as_ids(base, "base"), _as_ids(target, "target")
    lengths = check_pair(base, target, lengths, target_lengths, pad_id(model))
    plan = _normalise(model, dictionary, site, features)
    saved, clean = clean_run(model, target, list(plan), lengths), clean_run(model, base, [], lengths)
    z, norms = patched_run(model, plan, base, saved, lengths, start)
    y = saved["logits"]
    kl = kl_divergence(z, y)
    by_site, all_norms = {}, []
    for s, (d, _) in plan.items():
        first = default_start(d) if start is None else start
        mask = position_mask(lengths, base.shape[1], first, norms[s].device)
        by_site[s] = float(norms[s][mask].mean()) if mask.any() else 0.0
        all_norms.append(norms[s][mask])
    edits = torch.cat([n.cpu() for n in all_norms])
    return PatchResult(
        logits=z,
        target_logits=y,
        base_logits=clean["logits"],
        kl=float(kl.mean()),
        kl_reverse=float(kl_divergence(y, z).mean()),
        kl_per_prompt=kl,
        edit_magnitude=float(edits.mean()) if edits.numel() else 0.0,
        edit_by_site=by_site,
    )


@dataclass
class FeatureDeltas:
    """One site's code differences between target and base runs, for the candidate features only.

    ``delta[n, t, k] = c̄ − c`` of candidate ``features[k]`` at prompt n,
    position t (zero outside the patched positions), and ``directions[k]`` its
    decoder row, so the edit of a set S is ``delta[..., S] @ directions[S]``.
    Candidates are the features whose patch is non-zero on some prompt.

    Activations, deltas and logits are on the site's device in float32 (float64
    for a float64 model); ``features`` and ``lengths`` are CPU bookkeeping, and so
    is a ``member`` mask; they index the device tensors directly.
    """

    site: str
    features: torch.Tensor  # [K] feature ids in the dictionary (CPU)
    delta: torch.Tensor  # [N, T, K]
    directions: torch.Tensor  # [K, d]
    x_base: torch.Tensor  # [N, T, d] the base activation at the site
    target_logits: torch.Tensor  # [N, V]
    base_logits: torch.Tensor  # [N, V]
    lengths: torch.Tensor  # [N] (CPU)
    mask: torch.Tensor  # [N, T] patched positions
    d_dict: int

    @property
    def n_candidates(self) -> int:
        return int(self.features.numel())

    def edit(self, member: torch.Tensor) -> torch.Tensor:
        """[N, T, d]: the edit of the candidate subset ``member`` (bool [K])."""
        return self.delta[..., member] @ self.directions[member]

    def edit_magnitude(self, member: torch.Tensor) -> float:
        """Mean of ‖x' − x‖₂ over prompts and patched positions for the subset ``member``."""
        return float(self.edit(member).norm(dim=-1)[self.mask].mean())

    def member(self, features: Iterable[int]) -> torch.Tensor:
        """Bool [K] for dictionary feature ids (ids that are not candidates change nothing and are ignored)."""
        pos = {int(f): k for k, f in enumerate(self.features.tolist())}
        m = torch.zeros(self.n_candidates, dtype=torch.bool, device="cpu")
        for f in features:
            if int(f) in pos:
                m[pos[int(f)]] = True
        return m


@torch.no_grad()
def feature_deltas(
    model: Any,
    dictionary: Dictionary,
    site: str,
    base: Any,
    target: Any,
    *,
    lengths: Any = None,
    target_lengths: Any = None,
    start: "int | None" = None,
) -> FeatureDeltas:
    """Run target and base once each and collect what patching any feature subset needs."""
    base, target = _as_ids(base, "base"), _as_ids(target, "target")
    lengths = check_pair(base, target, lengths, target_lengths, pad_id(model))
    check_dictionary(model, site, dictionary)
    site = str(sites_mod.Site.parse(site))
    saved, clean = clean_run(model, target, [site], lengths), clean_run(model, base, [site], lengths)
    x = wide(clean[site])
    first = default_start(dictionary) if start is None else start
    mask = position_mask(lengths, base.shape[1], first, x.device)
    w = dictionary.W_dec.detach().to(x.dtype)
    wd = dictionary.W_dec.dtype
    dc = (dictionary.encode(saved[site].to(wd)) - dictionary.encode(x.to(wd))).to(x.dtype) * mask[..., None]
    candidates = dc.abs().amax(dim=(0, 1)).nonzero().flatten().cpu()
    if candidates.numel() == 0:
        raise NothingToPatch(
            f"no feature of the {dictionary.architecture} dictionary at {site} differs between base and target "
            "prompts: nothing to patch"
        )
    return FeatureDeltas(
        site=site,
        features=candidates,
        delta=dc[..., candidates].contiguous(),
        directions=w[candidates].contiguous(),
        x_base=x,
        target_logits=saved["logits"],
        base_logits=clean["logits"],
        lengths=lengths,
        mask=mask,
        d_dict=dictionary.d_dict,
    )
