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


def halving(result: dict, fraction: float = 0.5) -> dict:
    """The smallest patch among a curve's records with KL ≤ ``fraction`` × KL(nothing patched).

    Read off the recorded points, so as the thresholds. ``features``
    and ``edit_magnitude`` come from one record: the one with the fewest
    features (ties: the smaller edit). ``min_edit`` is the smallest edit among
    the records that get there and ``min_edit_features`` that record's feature
    count — with ACDC's records they are usually the same record, with another
    ordering not always. All are None when no record gets there; ``floor`` is
    the lowest KL reached.
    """
    goal = fraction * result["start"]["none"]["kl"]
    hits = [r for r in result["records"] if r["kl"] <= goal]
    fewest = min(hits, key=lambda r: (r["n_features"], r["edit_magnitude"]), default=None)
    smallest = min(hits, key=lambda r: (r["edit_magnitude"], r["n_features"]), default=None)
    return {
        "label": result["label"],
        "site": result["site"],
        "method": result["method"],
        "features": fewest and fewest["n_features"],
        "edit_magnitude": fewest and fewest["edit_magnitude"],
        "min_edit": smallest and smallest["edit_magnitude"],
        "min_edit_features": smallest and smallest["n_features"],
        "kl_none": result["start"]["none"]["kl"],
        "floor": min(r["kl"] for r in result["records"]),
    }


def transfer(r: dict) -> dict:
    """How much of the KL the set that (first) halves it on the selection prompts removes on the held-out ones.

    ``removed_selection`` / ``removed_heldout``: 1 − KL(set patched) / KL(nothing patched) on each prompt set,
    for the record :func:`halving` picks; ``heldout_halving``: the fewest features of the same curve's records
    that halve the held-out KL (None: none does). Only ``features`` when the curve has no held-out scores.
    """
    h = halving(r)
    out = {"label": r["label"], "site": r["site"], "method": r["method"], "features": h["features"]}
    held = r.get("heldout", {})
    if "records" not in held:
        return out
    none_sel, none_held = r["start"]["none"]["kl"], held["start"]["none"]["kl"]
    out.update(
        kl_none_selection=none_sel,
        kl_none_heldout=none_held,
        kl_all_candidates_heldout=held["start"]["all"]["kl"],
        heldout_halving=halving({**r, "start": held["start"], "records": held["records"]})["features"],
    )
    if h["features"] is not None:
        i = next(i for i, x in enumerate(r["records"]) if x["n_features"] == h["features"] and x["kl"] <= none_sel / 2)
        out["removed_selection"] = 1 - r["records"][i]["kl"] / none_sel
        out["removed_heldout"] = 1 - held["records"][i]["kl"] / none_held
    return out


def _short(lab: str) -> str:
    """'baseline α=1 (R=4)' -> 'α = 1', 'gated λ=2 (R=3)' -> 'Gated'."""
    if lab.startswith("baseline α="):
        return "α = " + lab.split("=")[1].split()[0]
    return "Gated" if lab.startswith("gated") else lab


def halving_table(out: dict) -> str:
    """A Markdown table of a results file's ``halving`` and ``transfer`` lists, one row per curve: what halves
    the KL on the selection prompts and how that set carries over to the held-out ones."""

    def num(v, fmt):
        return "never" if v is None else format(v, fmt)

    moved = {(t["site"], t["label"], t["method"]): t for t in out["transfer"]}
    rows = [
        "| site | order | dictionary | features | edit | floor | held-out: KL removed by the same set "
        "| held-out: features to halve |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for h in out["halving"]:
        t = moved.get((h["site"], h["label"], h["method"]), {})
        removed = t.get("removed_heldout")
        order = "**ACDC**" if h["method"] == "acdc" else h["method"]
        rows.append(
            f"| {h['site']} | {order} | {_short(h['label'])} | {num(h['features'], 'd')} "
            f"| {'–' if h['edit_magnitude'] is None else format(h['edit_magnitude'], '.1f')} "
            f"| {max(h['floor'], 0.0):.2f} | {'–' if removed is None else f'{removed:.0%}'} "
            f"| {num(t.get('heldout_halving'), 'd') if 'heldout_halving' in t else '–'} |"
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
