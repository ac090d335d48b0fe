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

import json
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from circuitsae.config import model_dtype_option, option
from circuitsae.dictionaries import Dictionary, PCADictionary, load_dictionary
from circuitsae.errors import CircuitSAEError, NothingToPatch
from circuitsae.store import atomic_write, digest


@dataclass
class IOIConfig:
    """Feature patching on IOI with ACDC ordering, for several dictionaries."""

    dictionaries: tuple[str, ...] = option((), "saved dictionary folders (or training output folders)", cli=False)
    model: "str | None" = option(None, "model (default: the one the dictionaries were trained on)")
    prompts: int = option(50, "IOI prompt pairs")
    seed: int = option(0, "seed of the prompts and of ACDC's visiting order")
    thresholds: int = option(50, "ACDC thresholds τ, log-spaced over [1e-5, 1]")
    pca: bool = option(True, "add a PCA baseline per site, fitted on the dictionaries' activation store")
    pca_rows: int = option(200_000, "activations to fit PCA on")
    acdc: bool = option(True, "order by exact ACDC")
    acdc_dense: bool = option(
        True, "exact ACDC also for dense dictionaries (α = 0, PCA): every feature a candidate, slow on a CPU"
    )
    attribution: bool = option(True, "also order by attribution (one backward pass) and plot it beside ACDC")
    heldout_prompts: int = option(
        0,
        "also patch every chosen feature set into this many other prompts (the other half of the templates and "
        "names; the orderings then use the first half); 0: off",
    )
    engine: str = option("auto", "evaluator: auto, downstream (later layers only) or hook (full passes)")
    out: str = option("runs/ioi", "output folder: kl_vs_patches.json and .png")
    device: "str | None" = option(None, "cpu, cuda, ... (default: cuda if available)")
    model_dtype: "str | None" = model_dtype_option()

    def __post_init__(self) -> None:
        self.dictionaries = tuple(self.dictionaries)
        if self.prompts < 1 or self.thresholds < 1:
            raise CircuitSAEError("prompts and thresholds must be >= 1")
        if self.heldout_prompts < 0:
            raise CircuitSAEError("heldout_prompts must be >= 0")
        if not (self.acdc or self.attribution):
            raise CircuitSAEError("choose at least one ordering: ACDC or attribution")
        if self.engine not in ("auto", "downstream", "hook"):
            raise CircuitSAEError(f"engine must be auto, downstream or hook, not {self.engine!r}")


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


def _pca_for(site: str, dictionaries: list[Dictionary], rows: int) -> PCADictionary:
    from circuitsae.store import ActivationStore

    stores = {d.meta.get("store") for d in dictionaries} - {None}
    if not stores:
        raise CircuitSAEError(f"cannot fit PCA at {site}: the dictionaries do not record their store (use --no-pca)")
    store = sorted(stores)[0]
    if not Path(store).exists():
        raise CircuitSAEError(f"cannot fit PCA at {site}: store {store} is missing (use --no-pca)")
    pca = PCADictionary.fit(ActivationStore(store), site=site, max_rows=rows)
    return pca


def halving(result: dict, fraction: float = 0.5) -> dict:
    """The smallest patch among a curve's records with KL ≤ ``fraction`` × KL(nothing patched).

    Read off the recorded points, so as coarse as the thresholds. ``features``
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
    from circuitsae.downstream import make_evaluator
    from circuitsae.patching import feature_deltas

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


def _dense(d: Dictionary) -> bool:
    """PCA and the α = 0 dictionary: codes are dense, so every feature is a candidate."""
    return d.architecture == "pca" or d.meta.get("training", {}).get("coefficient") == 0


def _fingerprint(cfg: IOIConfig, path: str, d: Dictionary, thresholds: np.ndarray, dtype: str) -> str:
    """Names a finished curve by everything it depends on, so a changed setting is never served stale.

    A saved dictionary is identified by its files, one fitted here (PCA) by its weights; the model's dtype
    counts when it is not float32 (curves cached before dtypes were a choice were float32).
    """
    import hashlib

    if Path(path).is_dir():
        stamp = digest([path])
    else:
        stamp = hashlib.sha1(b"".join(t.detach().cpu().numpy().tobytes() for t in d.state_dict().values())).hexdigest()
    key = json.dumps([cfg.model, cfg.prompts, cfg.seed, cfg.engine, path, stamp, list(thresholds)])
    if cfg.heldout_prompts:  # other selection prompts, and the held-out scores
        key += f"heldout{cfg.heldout_prompts}"
    if dtype != "float32":
        key += dtype
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def run_ioi(config: "IOIConfig | None" = None, *, model: Any = None, progress: bool = True, **overrides: Any) -> dict:
    """Run the experiment; write ``kl_vs_patches.json`` and ``.png`` into ``config.out``; return the report."""
    from circuitsae.acdc import acdc, default_thresholds
    from circuitsae.evaluate import dictionary_folders
    from circuitsae.models import dtype_name, input_device, load_model
    from circuitsae.tasks.ioi import ioi_performance, make_ioi

    cfg = IOIConfig(**{**(asdict(config) if config else {}), **overrides})
    t_all = time.perf_counter()
    folders = dictionary_folders(cfg.dictionaries)
    # loaded on the CPU; each goes to its site's device when its curve starts (acdc places it), as PCA does
    dicts = [(str(p), load_dictionary(p)) for p in folders]
    models = {d.meta.get("model") for _, d in dicts} - {None}
    if model is None:
        if cfg.model is None and len(models) > 1:
            raise CircuitSAEError(f"the dictionaries come from different models: {sorted(models)}")
        name = cfg.model or (models.pop() if models else "smollm2-135m")
        model = load_model(name, device=cfg.device, dtype=cfg.model_dtype)
    if cfg.heldout_prompts:
        ds, ds_heldout = split_prompts(model, cfg.prompts, cfg.heldout_prompts, cfg.seed)
    else:
        ds, ds_heldout = make_ioi(model, n=cfg.prompts, seed=cfg.seed), None
    perf = ioi_performance(model, ds)
    perf_heldout = ioi_performance(model, ds_heldout) if ds_heldout is not None else None
    by_site: dict[str, list[tuple[str, Dictionary]]] = {}
    for path, d in dicts:
        site = d.meta.get("site")
        if site is None:
            raise CircuitSAEError(f"{path} does not record its site")
        by_site.setdefault(site, []).append((path, d))
    thresholds = np.logspace(-5, 0, cfg.thresholds) if cfg.thresholds != 50 else default_thresholds()
    parts = Path(cfg.out) / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    skipped: list[dict] = []  # dictionaries with no feature that differs between base and target prompts

    def write(complete: bool = False) -> dict:
        """JSON and PNG of the curves finished so far (after each one, so an interrupted run still shows them)."""
        report = {
            "model": str(getattr(getattr(model, "_module", model).config, "name_or_path", "")),
            "model_dtype": dtype_name(model),
            "device": str(input_device(model)),
            "machine": platform.node() or "unknown",
            "prompts": cfg.prompts,
            "seed": cfg.seed,
            "thresholds": [float(t) for t in thresholds],
            "ioi": perf,
            "heldout_prompts": cfg.heldout_prompts,
            "ioi_heldout": perf_heldout,
            "config": asdict(cfg),
            "results": results,
            "skipped": skipped,
            "seconds": time.perf_counter() - t_all,
            "complete": complete,
        }
        atomic_write(parts.parent / "kl_vs_patches.json", json.dumps(report, indent=1).encode())
        plot_curves(report, parts.parent / "kl_vs_patches.png")
        if any("records" in r.get("heldout", {}) for r in results):
            plot_transfer(report, parts.parent / "kl_vs_patches_heldout.png")
        return report

    for site, entries in sorted(by_site.items(), key=lambda kv: int(kv[0].split(".")[1])):
        if cfg.pca:
            t0 = time.perf_counter()
            pca = _pca_for(site, [d for _, d in entries], cfg.pca_rows)
            pca.meta["fit_seconds"] = time.perf_counter() - t0
            entries = entries + [("pca", pca)]
        # sparse dictionaries first: dense ones (α = 0, PCA: every feature a candidate) take longest
        entries.sort(key=lambda e: (_dense(e[1]), _dense(e[1]) and e[1].d_dict))
        for path, d in entries:
            orders = ["acdc"] * (cfg.acdc and (cfg.acdc_dense or not _dense(d))) + ["attribution"] * cfg.attribution
            for order in orders:
                # each curve is kept as it finishes, so an interrupted run resumes at the next one
                part = (
                    parts
                    / f"{site}-{label(d)}-{order}-{_fingerprint(cfg, path, d, thresholds, dtype_name(model))}.json".replace(
                        " ", "_"
                    )
                )
                if part.exists():
                    results.append(json.loads(part.read_text()))
                    continue
                try:
                    # exact ACDC also keeps its state after every threshold: an hours-long curve resumes
                    state = part.with_name(part.stem + ".state.json") if order == "acdc" else None
                    res = acdc(model, d, site, ds, thresholds=thresholds, seed=cfg.seed, order=order,
                               engine=cfg.engine, progress=progress, checkpoint=state)  # fmt: skip
                except NothingToPatch as e:  # one dead dictionary does not stop the others' curves
                    warnings.warn(f"{label(d)} ({path}) skipped: {e}", stacklevel=2)
                    skipped.append({"site": site, "label": label(d), "path": path, "reason": str(e)})
                    break  # the other ordering has nothing to patch either
                row = res.to_json()
                row.update(label=label(d), path=path, architecture=d.architecture, d_dict=d.d_dict)
                if ds_heldout is not None:
                    t0 = time.perf_counter()
                    try:
                        row["heldout"] = score_sets(model, d, site, ds_heldout, feature_sets(row, res.order),
                                                    cfg.engine)  # fmt: skip
                        row["heldout"]["seconds"] = time.perf_counter() - t0
                    except NothingToPatch as e:
                        row["heldout"] = {"prompts": len(ds_heldout), "skipped": str(e)}
                row["order"] = row["order"][:100]  # the most important features; the full list is long
                atomic_write(part, json.dumps(row).encode())
                results.append(row)
                write()
                if progress:
                    print(f"{site} {label(d):28s} {order:11s} {res.n_candidates:5d} candidates "
                          f"{res.evaluations:6d} evaluations {res.seconds:7.1f} s")  # fmt: skip
    report = write(complete=True)
    report["path"] = str(Path(cfg.out) / "kl_vs_patches.json")
    return report


def _figure_legend(fig: Any, axes: Any) -> None:
    """One legend below all panels of a constrained-layout figure: every label once, readable size."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, lab in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(lab, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside lower center", fontsize=10,
                   ncol=min(4, len(entries)), frameon=False)  # fmt: skip


CUT = 1e-3  # the curve plots' y axis starts at CUT × KL(nothing patched)


def plot_curves(report: dict, path: "str | Path", sites: "list[str] | None" = None) -> Path:
    """KL vs features patched (left) and KL vs edit magnitude (right), one row per site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    sites = sites or sorted({r["site"] for r in results}, key=lambda s: int(s.split(".")[1]))
    # one legend for the whole figure, below the plots, in the axis labels' size (inside a panel it hid curves)
    fig, axes = plt.subplots(len(sites), 2, figsize=(12, 4.2 * len(sites) + 0.8), squeeze=False, layout="constrained")
    labels = list(dict.fromkeys(r["label"] for r in results))
    colours = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    for row, site in zip(axes, sites):
        floor = None
        for r in (r for r in results if r["site"] == site):
            recs = [r["start"]["all"]] + r["records"] if r["method"] == "acdc" else r["records"]
            n = np.array([x["n_features"] for x in recs], float)
            kl = np.array([x["kl"] for x in recs])
            edit = np.array([x["edit_magnitude"] for x in recs])
            style = dict(color=colours[r["label"]], lw=1.6 if r["method"] == "acdc" else 1.0)
            style["ls"] = "-" if r["method"] == "acdc" else ":"
            name = r["label"] if r["method"] == "acdc" else f"{r['label']} (attribution)"
            ok = n > 0
            row[0].plot(n[ok], kl[ok], marker="." if r["method"] == "acdc" else None, label=name, **style)
            row[1].plot(edit[ok], kl[ok], marker="." if r["method"] == "acdc" else None, **style)
            floor = r["start"]["none"]["kl"]
        for ax in row:
            ax.set_yscale("log")
            if floor is not None:
                ax.axhline(floor, color="grey", ls="--", lw=0.8)
                # a lossless dictionary with every candidate patched reaches ~1e-8: cut there, the floors stay
                ax.set_ylim(bottom=max(ax.get_ylim()[0], CUT * floor))
            ax.set_xscale("log")
            ax.set_ylabel("KL(patched ‖ target), mean over prompts")
            ax.grid(alpha=0.3, which="both")
        row[0].set_xlabel("features patched")
        row[1].set_xlabel("mean edit magnitude ‖x' − x‖")
        row[0].set_title(f"{site}: KL vs number of features patched (grey: nothing patched)")
        row[1].set_title(f"{site}: KL vs edit magnitude")
    _figure_legend(fig, axes[:, 0])
    methods = {r["method"] for r in results}
    key = ", ".join(
        k for m, k in (("acdc", "solid: ACDC order"), ("attribution", "dotted: attribution order")) if m in methods
    )
    fig.suptitle(
        f"IOI feature patching, {report['model']}, {report['prompts']} prompts ({key}; "
        f"KL below {CUT:g} × unpatched not shown)"
    )
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_transfer(report: dict, path: "str | Path", sites: "list[str] | None" = None) -> Path:
    """Fraction of the unpatched KL left vs features patched: on the selection prompts (solid) and the same
    feature sets on the held-out prompts (dashed), one panel per site and ordering."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if "records" in r.get("heldout", {})]
    sites = sites or sorted({r["site"] for r in results}, key=lambda s: int(s.split(".")[1]))
    methods = [m for m in ("acdc", "attribution") if any(r["method"] == m for r in results)]
    fig, axes = plt.subplots(len(sites), len(methods), figsize=(6.5 * len(methods), 4.2 * len(sites) + 1.0),
                             squeeze=False, layout="constrained")  # fmt: skip
    labels = list(dict.fromkeys(r["label"] for r in report["results"]))
    colours = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    for row, site in zip(axes, sites):
        for ax, method in zip(row, methods):
            top = 1.2
            mine = [r for r in results if r["site"] == site and r["method"] == method]
            if not mine:  # e.g. exact ACDC run at some sites only
                ax.text(0.5, 0.5, f"{site}: no {method} curve", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            for r in mine:
                for recs, none, ls, tag in (
                    (r["records"], r["start"]["none"]["kl"], "-", "selection"),
                    (r["heldout"]["records"], r["heldout"]["start"]["none"]["kl"], "--", "held-out"),
                ):
                    n = np.array([x["n_features"] for x in recs], float)
                    frac = np.array([x["kl"] for x in recs]) / none
                    ok = n > 0
                    ax.plot(n[ok], frac[ok], ls=ls, marker=("." if ls == "-" else "x") if method == "acdc" else None,
                            color=colours[r["label"]], label=f"{r['label']} ({tag})")  # fmt: skip
                    top = max(top, 1.05 * float(frac[ok].max(initial=0)))
            ax.axhline(0.5, color="grey", ls=":", lw=0.8)
            ax.axhline(1.0, color="grey", ls="--", lw=0.8)
            ax.set_xscale("log")
            ax.set_ylim(0, top)
            ax.set_xlabel("features patched (chosen on the selection prompts)")
            ax.set_ylabel("KL / KL(nothing patched)")
            ax.set_title(f"{site}, {method} order: selection (solid) vs held-out prompts (dashed)", fontsize=9)
            ax.grid(alpha=0.3, which="both")
    _figure_legend(fig, axes.ravel())
    n_sel, n_held = report["prompts"], report.get("heldout_prompts")
    fig.suptitle(f"IOI: do the features chosen on {n_sel} prompts carry over\nto {n_held} prompts with other "
                 "names and templates? (grey: all and half of the unpatched KL)", fontsize=10)  # fmt: skip
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
