"""Evaluate dictionaries: reconstruction metrics and loss recovered (REFERENCE §3).

Reconstruction (L0, FVU, γ, dead/dense fractions, density histogram) uses the
store's held-out activations. Fidelity splices each dictionary into the model
(:mod:`circuitsae.interventions.splice`) on held-out contexts and compares next-token
cross-entropy with the clean run and with the site zero-ablated::

    loss_recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean)

reported with ΔCE = CE_spliced − CE_clean and KL(clean ‖ spliced) per token.
CE and KL are taken over the positions the dictionary applies to (after the
BOS token when the store skipped it), on the same tokens for all three runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from circuitsae import metrics
from circuitsae.config import model_dtype_option, option
from circuitsae.data.store import ActivationStore
from circuitsae.dictionaries import Dictionary, load_dictionary
from circuitsae.dictionaries.folders import dictionary_folders
from circuitsae.errors import CircuitSAEError
from circuitsae.interventions.splice import check_dictionary, default_start, run_ablated, run_spliced
from circuitsae.io import atomic_write
from circuitsae.models import input_device


@dataclass
class EvalConfig:
    """Evaluate saved dictionaries on a store's held-out split."""

    dictionaries: tuple[str, ...] = option(
        (), "saved dictionary folders (or a training output folder)", positional="DICTIONARY"
    )
    store: "str | None" = option(None, "activation store (default: the one each dictionary was trained on)")
    model: "str | None" = option(None, "model to splice into (default: the store's model)")
    contexts: int = option(32, "held-out contexts for loss recovered")
    rows: int = option(65536, "held-out activations for L0/FVU/γ")
    batch_size: int = option(8, "contexts per forward pass")
    out: "str | None" = option(None, "JSON file to write (default: eval.json beside the first dictionary)")
    device: "str | None" = option(None, "cpu, cuda, ... (default: cuda if available)")
    model_dtype: "str | None" = model_dtype_option()

    def __post_init__(self) -> None:
        if self.contexts < 1 or self.rows < 1 or self.batch_size < 1:
            raise CircuitSAEError("contexts, rows and batch_size must be >= 1")
        self.dictionaries = tuple(self.dictionaries)


@torch.no_grad()
def reconstruction(dictionary: Dictionary, x: torch.Tensor, chunk: int = 8192) -> dict:
    """L0, FVU, γ, MSE, dead/dense fractions and density histogram of ``dictionary`` on ``x`` ``[n, d]``.

    ``x`` may live anywhere: each chunk is moved to the dictionary's device and dtype; sums are float64.
    """
    stats = metrics.ReconstructionStats()
    for i in range(0, x.shape[0], chunk):
        xi = x[i : i + chunk].to(dictionary.W_dec.device, dictionary.W_dec.dtype)
        out = dictionary(xi)
        stats.update(xi, out.x_hat, out.codes)
    return stats.summary()


@torch.no_grad()
def fidelity(
    model: Any,
    dictionaries: "list[tuple[str, Dictionary]]",
    input_ids: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict]:
    """Loss recovered, ΔCE and KL for each ``(site, dictionary)``, spliced alone, on ``input_ids``.

    The clean run is shared; each site is zero-ablated once.
    """
    for site, dictionary in dictionaries:
        check_dictionary(model, site, dictionary)
    device = input_device(model)
    n = input_ids.shape[0]
    starts = [default_start(d) for _, d in dictionaries]
    ablations = sorted({(site, start) for (site, _), start in zip(dictionaries, starts)})
    # batch-weighted means, keyed by what was run: ("clean", start), ("zero", site, start), ("spliced"|"kl", i)
    totals: dict[tuple, float] = {}

    def add(key: tuple, value: torch.Tensor, w: float) -> None:
        totals[key] = totals.get(key, 0.0) + w * float(value.mean())

    steps = len(range(0, n, batch_size)) * (1 + len(ablations) + len(dictionaries))
    with tqdm(total=steps, desc="loss recovered", unit="pass", disable=not progress, leave=False) as bar:
        for b in range(0, n, batch_size):
            ids = input_ids[b : b + batch_size].to(device)
            w = ids.shape[0] / n
            clean = run_spliced(model, ids, {})
            for start in set(starts):
                add(("clean", start), metrics.cross_entropy(clean, ids, start), w)
            for site, start in ablations:
                add(("zero", site, start), metrics.cross_entropy(run_ablated(model, ids, [site], start), ids, start), w)
            bar.update(1 + len(ablations))
            for i, ((site, dictionary), start) in enumerate(zip(dictionaries, starts)):
                spliced = run_spliced(model, ids, {site: dictionary})
                add(("spliced", i), metrics.cross_entropy(spliced, ids, start), w)
                add(("kl", i), metrics.kl_divergence(clean[:, start:-1], spliced[:, start:-1]), w)
                bar.update()
    results = []
    for i, ((site, _), start) in enumerate(zip(dictionaries, starts)):
        ce_clean, ce_zero, ce_spliced = totals["clean", start], totals["zero", site, start], totals["spliced", i]
        results.append(
            {
                "ce_clean": ce_clean,
                "ce_spliced": ce_spliced,
                "ce_zero": ce_zero,
                "delta_ce": ce_spliced - ce_clean,
                "loss_recovered": metrics.loss_recovered(ce_clean, ce_spliced, ce_zero),
                "kl": totals["kl", i],
                "contexts": n,
                "tokens": int(n * (input_ids.shape[1] - 1 - start)),
            }
        )
    return results


def evaluate(config: "EvalConfig | None" = None, *, model: Any = None, progress: bool = True, **overrides: Any) -> dict:
    """Evaluate saved dictionaries; returns ``{name: metrics}`` and writes it as JSON."""
    from circuitsae.models import dtype_name, load_model, model_name

    cfg = EvalConfig(**{**(vars(config) if config else {}), **overrides})
    folders = dictionary_folders(cfg.dictionaries)
    loaded = [(f, load_dictionary(f)) for f in folders]
    store_paths = {cfg.store or d.meta.get("store") for _, d in loaded}
    if None in store_paths:
        raise CircuitSAEError("a dictionary does not name its activation store: pass --store")
    stores = {p: ActivationStore(p) for p in store_paths}
    wanted = cfg.model or next(iter(stores.values())).config["model"]
    if model is None:
        model = load_model(wanted, device=cfg.device, dtype=cfg.model_dtype)
    results: dict[str, dict] = {}
    by_store: dict[str, list[tuple[str, tuple[str, Any]]]] = {}  # store -> [(name, (site, dictionary))]
    for folder, d in loaded:
        store_path = cfg.store or d.meta["store"]
        store = stores[store_path]
        site = d.meta.get("site")
        if site is None or site not in store.sites:
            raise CircuitSAEError(f"{folder}: its site {site!r} is not in store {store.root}")
        check_dictionary(model, site, d)  # on the site's device from here on: metrics are computed there
        x = store.activations(site, "heldout", max_rows=cfg.rows)
        rec = reconstruction(d, x)
        results[folder.name] = {
            "path": str(folder),
            "store": str(store_path),
            "architecture": d.architecture,
            "site": site,
            "d_dict": d.d_dict,
            "coefficient": d.meta.get("training", {}).get("coefficient"),
            **rec,
        }
        by_store.setdefault(store_path, []).append((folder.name, (site, d)))
    # loss recovered of each dictionary on the held-out text of its own store (never another store's
    # training text); one model pass per store serves all of that store's dictionaries
    for store_path, members in by_store.items():
        ids = stores[store_path].tokens("heldout")[: cfg.contexts]
        if ids.shape[0] == 0:
            raise CircuitSAEError(f"store {store_path} has no held-out contexts to measure loss recovered on")
        for (name, _), fid in zip(members, fidelity(model, [p for _, p in members], ids, cfg.batch_size, progress)):
            results[name].update(fid)
    out = Path(cfg.out) if cfg.out else folders[0].parent / "eval.json"
    report = {"model": model_name(model), "model_dtype": dtype_name(model), "results": results}
    atomic_write(out, json.dumps(report, indent=1).encode())
    report["path"] = str(out)
    return report


def format_table(results: dict) -> str:
    """A plain-text table of the headline metrics, one row per dictionary."""
    cols = [
        ("name", "{}"),
        ("l0", "{:.1f}"),
        ("fvu", "{:.3f}"),
        ("gamma", "{:.3f}"),
        ("loss_recovered", "{:.3f}"),
        ("delta_ce", "{:.3f}"),
        ("kl", "{:.3f}"),
        ("dead_fraction", "{:.3f}"),
        ("dense_fraction", "{:.3f}"),
    ]
    rows = [[c for c, _ in cols]]
    for name, r in results.items():
        rows.append([name] + [fmt.format(r[c]) if r.get(c) is not None else "-" for c, fmt in cols[1:]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join(
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in rows
    )
