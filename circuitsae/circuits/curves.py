"""The IOI feature-patching experiment (Cunningham et al. Fig. 3 and Fig. 17) end to end.

For every dictionary given (baseline SAEs, Gated SAEs, the α = 0 dictionary)
plus a PCA rotation fitted at each site, on the same IOI prompts: order the
features by ACDC (and, optionally, by attribution), and plot KL(patched ‖
target) against the number of features patched and against the mean edit
size. ``circuitsae ioi DICT ...`` runs it from the command line.

**Selection and evaluation on different prompts** (``heldout_prompts > 0``):
the orderings then choose their feature sets on prompts built from half of
the templates and half of the names (:func:`split_prompts`), and every
recorded set is also patched, unchanged, into prompts built from the other
templates and names (:func:`score_sets`); each curve gains a ``heldout``
record list. A circuit that works only on the prompts it was chosen on is not
the paper's claim.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from circuitsae.dictionaries import Dictionary


def label(dictionary: Dictionary) -> str:
    """A short legend label: kind, coefficient and width."""
    arch = dictionary.architecture
    if arch == "pca":
        return "PCA"
    if arch == "identity":
        return "neuron basis"
    coef = dictionary.meta.get("training", {}).get("coefficient")
    r = dictionary.d_dict / dictionary.d
    width = f"R={r:g}"
    if arch == "relu" and coef is None:  # not trained here: no coefficient to name
        return f"baseline ({width})"
    if arch == "relu":
        return f"baseline α=0 ({width})" if coef == 0 else f"baseline α={coef:g} ({width})"
    if coef is None:
        return f"{arch} ({width})"
    symbol = "k" if arch in ("topk", "batchtopk") else "λ"
    return f"{arch} {symbol}={coef:g} ({width})"


def crossing(records: list[dict], goal: float) -> "tuple[float, int, int] | None":
    """Where a curve crosses ``goal``, interpolated on log(features): ``(n, below, at_or_above)`` or None.

    The bracket is the grid point — the record with the fewest features whose KL is ≤ ``goal`` (n₁ features,
    KL k₁) — and the record with the most features among those with fewer (n₀, KL k₀ > goal: all of them are
    above the goal, or n₁ would not be the fewest). Between the two the curve is taken as a straight line in
    (log n, KL), so

        log n = log n₀ + (k₀ − goal) / (k₀ − k₁) · (log n₁ − log n₀).

    Log n because the records are spaced geometrically in n (the thresholds are log-spaced and the plots'
    feature axis is logarithmic); KL itself, not log KL, because the goal is a fraction of the KL, the two
    bracketing KLs are within a factor of two of each other near half the unpatched KL (on
    ``benchmarks/results/kl_vs_patches.json`` the two choices differ by at most 2.5%), and log KL breaks down
    where k₁ is ~0 or rounds below 0 (a lossless dictionary with every candidate patched: KL ~1e-8).
    None when no record gets to ``goal`` or none with fewer features (> 0) is recorded.
    """
    hits = [r for r in records if r["kl"] <= goal]
    if not hits:
        return None
    hit = min(hits, key=lambda r: (r["n_features"], r["edit_magnitude"]))
    below = [r for r in records if 0 < r["n_features"] < hit["n_features"]]
    if not below:
        return None
    lo = max(below, key=lambda r: (r["n_features"], -r["kl"]))
    n0, n1, k0, k1 = lo["n_features"], hit["n_features"], lo["kl"], hit["kl"]
    t = (k0 - goal) / (k0 - k1)
    return math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))), n0, n1


def halving(result: dict, fraction: float = 0.5) -> dict:
    """Where a curve first gets to KL ≤ ``fraction`` × KL(nothing patched): the grid point and the crossing.

    ``features`` and ``edit_magnitude`` come from one recorded point (the grid point): the record with the
    fewest features that gets there (ties: the smaller edit). On a 20-threshold curve neighbouring records
    are up to 1.7× apart in features, so ``features_interpolated`` is the crossing read off between that
    record and the one before it (:func:`crossing`: linear in log n against KL), and ``bracket`` the two
    recorded feature counts around it ``[below, grid point]`` (None when there is no record below).
    ``min_edit`` is the smallest edit among the records that get there and ``min_edit_features`` that
    record's feature count — with ACDC's records usually the grid point, with another ordering not always.
    All of these are None when no record gets there.

    ``floor`` is the lowest KL the curve reaches (its records and, when recorded, the every-candidate end);
    ``kl_all`` the KL with every candidate patched (``start["all"]``; None if not recorded). They differ
    where patching some candidates moves the KL away from the target (α = 1 at resid.27: 1.61 vs 1.77).
    """
    goal = fraction * result["start"]["none"]["kl"]
    hits = [r for r in result["records"] if r["kl"] <= goal]
    fewest = min(hits, key=lambda r: (r["n_features"], r["edit_magnitude"]), default=None)
    smallest = min(hits, key=lambda r: (r["edit_magnitude"], r["n_features"]), default=None)
    cross = crossing(result["records"], goal)
    every = result["start"].get("all")
    return {
        "label": result["label"],
        "site": result["site"],
        "method": result["method"],
        "features": fewest and fewest["n_features"],
        "features_interpolated": cross and cross[0],
        "bracket": cross and [cross[1], cross[2]],
        "edit_magnitude": fewest and fewest["edit_magnitude"],
        "min_edit": smallest and smallest["edit_magnitude"],
        "min_edit_features": smallest and smallest["n_features"],
        "kl_none": result["start"]["none"]["kl"],
        "floor": min(r["kl"] for r in result["records"] + ([every] if every else [])),
        "kl_all": every and every["kl"],
    }


def transfer(r: dict) -> dict:
    """How much of the KL the set that (first) halves it on the selection prompts removes on the held-out ones.

    ``removed_selection`` / ``removed_heldout``: 1 − KL(set patched) / KL(nothing patched) on each prompt set,
    for the record :func:`halving` picks (its grid point: a recorded set). The sets removed 50–61% on their own
    prompts, so the fair figure is ``heldout_over_selection`` = removed_heldout / removed_selection (1: carries
    over in full). ``heldout_halving``: the fewest features of the same curve's records that halve the held-out
    KL (None: none does), ``heldout_halving_interpolated`` and ``heldout_bracket`` its crossing as in
    :func:`halving`. Only ``features`` when the curve has no held-out scores.
    """
    h = halving(r)
    out = {"label": r["label"], "site": r["site"], "method": r["method"], "features": h["features"]}
    held = r.get("heldout", {})
    if "records" not in held:
        return out
    none_sel, none_held = r["start"]["none"]["kl"], held["start"]["none"]["kl"]
    hh = halving({**r, "start": held["start"], "records": held["records"]})
    out.update(
        kl_none_selection=none_sel,
        kl_none_heldout=none_held,
        kl_all_candidates_heldout=held["start"]["all"]["kl"],
        heldout_halving=hh["features"],
        heldout_halving_interpolated=hh["features_interpolated"],
        heldout_bracket=hh["bracket"],
    )
    if h["features"] is not None:
        i = next(i for i, x in enumerate(r["records"]) if x["n_features"] == h["features"] and x["kl"] <= none_sel / 2)
        out["removed_selection"] = 1 - r["records"][i]["kl"] / none_sel
        out["removed_heldout"] = 1 - held["records"][i]["kl"] / none_held
        out["heldout_over_selection"] = out["removed_heldout"] / out["removed_selection"]
    return out


def _short(lab: str) -> str:
    """'baseline α=1 (R=4)' -> 'α = 1', 'gated λ=2 (R=3)' -> 'Gated'."""
    if lab.startswith("baseline α="):
        return "α = " + lab.split("=")[1].split()[0]
    return "Gated" if lab.startswith("gated") else lab


def _count(n: "int | None", interpolated: "float | None", bracket: "list[int] | None") -> str:
    """'~119 [102–122]' (the crossing and the two records around it), '77' (no record below), 'never'."""
    if n is None:
        return "never"
    return str(n) if interpolated is None else f"~{interpolated:.0f} [{bracket[0]}–{bracket[1]}]"


HALVING_HEADER = (
    "| site | order | dictionary | features to halve: ~interpolated [records around it] | edit (at the record) "
    "| floor (lowest KL) | KL, every candidate patched | held-out: KL removed by the same set "
    "| held-out / selection | held-out: features to halve |"
)


def halving_table(out: dict) -> str:
    """A Markdown table, one row per curve: what halves the KL on the selection prompts and how that set carries
    over to the held-out ones, computed here from the curves' records (``out["results"]``; :func:`halving`,
    :func:`transfer`). The feature counts are the crossing interpolated on log n with the two recorded counts
    around it (the upper one is the grid point, the set whose edit and held-out scores are shown)."""

    rows = [HALVING_HEADER, "|---" * HALVING_HEADER.count(" | ") + "|---|"]
    for curve in out["results"]:
        h, t = halving(curve), transfer(curve)
        removed, ratio = t.get("removed_heldout"), t.get("heldout_over_selection")
        order = "**ACDC**" if h["method"] == "acdc" else h["method"]
        held = (
            _count(t["heldout_halving"], t["heldout_halving_interpolated"], t["heldout_bracket"])
            if "heldout_halving" in t
            else "–"
        )
        kl_all = "–" if h["kl_all"] is None else f"{max(h['kl_all'], 0.0):.2f}"
        rows.append(
            f"| {h['site']} | {order} | {_short(h['label'])} "
            f"| {_count(h['features'], h['features_interpolated'], h['bracket'])} "
            f"| {'–' if h['edit_magnitude'] is None else format(h['edit_magnitude'], '.1f')} "
            f"| {max(h['floor'], 0.0):.2f} | {kl_all} | {'–' if removed is None else f'{removed:.0%}'} "
            f"| {'–' if ratio is None else f'{ratio:.2f}'} | {held} |"
        )
    return "\n".join(rows)


def split_prompts(model: Any, n_select: int, n_heldout: int, seed: int = 0) -> tuple[Any, Any]:
    """Two IOI datasets with no template and no name in common: even-numbered templates and names for
    selection, odd-numbered ones for evaluation (another seed too)."""
    from circuitsae.tasks.ioi import TEMPLATES, make_ioi, single_token_names

    names = single_token_names(model.tokenizer)
    select = make_ioi(model, n=n_select, seed=seed, templates=TEMPLATES[0::2], names=names[0::2])
    heldout = make_ioi(model, n=n_heldout, seed=seed + 1, templates=TEMPLATES[1::2], names=names[1::2])
    return select, heldout


def feature_sets(curve: dict, order: list[int]) -> list[list[int]]:
    """The feature set behind each record of a curve (``order``: its full candidate ordering).

    ACDC: the candidates not yet removed at the record's τ; attribution: the first ``n_features`` of the order.
    """
    if curve["method"] == "attribution":
        return [order[: r["n_features"]] for r in curve["records"]]
    removed = {int(f): float(t) for f, t in curve["removed_at"].items()}
    return [[f for f in order if not (f in removed and removed[f] <= r["tau"])] for r in curve["records"]]


@torch.no_grad()
def score_sets(model: Any, dictionary: Dictionary, site: str, dataset: Any, sets: list, engine: str = "auto") -> dict:
    """Patch each feature set, unchanged, into ``dataset``'s prompts: KL and edit per set, and the two ends.

    Features that change nothing on these prompts are patched as no-ops. Returns ``{"prompts", "start":
    {"none", "all"}, "records": [{n_features, kl, kl_reverse, edit_magnitude}]}`` with "all" = every feature
    whose patch is non-zero on these prompts.
    """
    from circuitsae.interventions.patching import feature_deltas
    from circuitsae.interventions.replay import make_evaluator

    fd = feature_deltas(model, dictionary, site, dataset.base, dataset.target, lengths=dataset.lengths)
    ev = make_evaluator(model, fd, dataset.base, engine)

    def measure(member: torch.Tensor, n: int) -> dict:
        st = ev.set_state(member)
        return {"n_features": n, "kl": float(st["kl"].mean()), "kl_reverse": float(st["kl_reverse"].mean()),
                "edit_magnitude": fd.edit_magnitude(member)}  # fmt: skip

    k = fd.n_candidates
    return {
        "prompts": len(dataset),
        "start": {
            "none": measure(torch.zeros(k, dtype=torch.bool, device="cpu"), 0),
            "all": measure(torch.ones(k, dtype=torch.bool, device="cpu"), k),
        },
        "records": [measure(fd.member(s), len(s)) for s in sets],
    }
