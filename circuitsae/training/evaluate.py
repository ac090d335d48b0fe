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
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from circuitsae import metrics
from circuitsae.config import model_dtype_option, option, validate
from circuitsae.data.store import ActivationStore, recorded_store
from circuitsae.data.stream import ModelStream
from circuitsae.dictionaries import Dictionary, load_dictionary
from circuitsae.dictionaries.folders import dictionary_folders
from circuitsae.errors import CircuitSAEError
from circuitsae.interventions.splice import check_dictionary, default_start, run_ablated, run_spliced
from circuitsae.io import atomic_write, lock_folder, probe_file
from circuitsae.models import input_device


@dataclass
class EvalConfig:
    """Evaluate saved dictionaries on a store's held-out split (or, for dictionaries trained from the model, on
    forward passes over the held-out split of the corpus they were trained on)."""

    dictionaries: tuple[str, ...] = option(
        (), "saved dictionary folders (or a training output folder)", positional="DICTIONARY"
    )
    store: "str | None" = option(None, "activation store (default: the one each dictionary was trained on)")
    model: "str | None" = option(None, "model to splice into (default: the store's model)")
    contexts: int = option(32, "held-out contexts for loss recovered", min=1, max=1 << 24)
    rows: int = option(65536, "held-out activations for L0/FVU/γ", min=1, max=1 << 30)
    batch_size: int = option(8, "contexts per forward pass", min=1, max=1 << 20)
    out: "str | None" = option(None, "JSON file to write (default: eval.json beside the first dictionary)")
    device: "str | None" = option(None, "cpu, cuda, ... (default: cuda if available)")
    model_dtype: "str | None" = model_dtype_option()

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class DictionaryMetrics:
    """One dictionary's evaluation: a row of ``eval.json``'s ``results`` (same keys, same order).

    Reconstruction metrics are over held-out activations of its store; CE, KL and loss recovered over
    ``contexts`` held-out contexts with the dictionary spliced in (``tokens`` predicted tokens).
    """

    path: str
    """The dictionary's folder."""
    store: str
    """The activation store it was evaluated on."""
    architecture: str
    """Its architecture (relu, gated, pca, ...)."""
    site: str
    """The site it reads and writes."""
    d_dict: int
    """Number of features."""
    coefficient: "float | None"
    """The sparsity coefficient it was trained with (None for dictionaries not trained here)."""
    tokens: int
    """Tokens whose next-token CE and KL were measured (as ``fidelity`` counts them)."""
    l0: float
    """Mean number of active features per activation."""
    fvu: float
    """Fraction of variance unexplained, ‖x − x̂‖² summed / the variance of x summed."""
    explained_variance: float
    """1 − FVU."""
    mse: float
    """Mean over activations of ‖x − x̂‖²."""
    gamma: float
    """Shrinkage γ: ‖x̂‖² / ⟨x̂, x⟩ summed (γ < 1 means x̂ is too short)."""
    dead_fraction: float
    """Fraction of features that never fired on the held-out activations."""
    dense_fraction: float
    """Fraction of features active on more than ``metrics.DENSE_THRESHOLD`` of the held-out activations."""
    density_histogram: dict[str, Any]
    """Histogram of log10 feature density (``log10_edges``, ``counts``, ``dead``)."""
    ce_clean: float
    """Next-token cross-entropy of the clean model."""
    ce_spliced: float
    """The same with the dictionary spliced in."""
    ce_zero: float
    """The same with the site zero-ablated."""
    delta_ce: float
    """ce_spliced − ce_clean."""
    loss_recovered: float
    """(ce_zero − ce_spliced) / (ce_zero − ce_clean)."""
    kl: float
    """Mean per token of KL(clean ‖ spliced)."""
    contexts: int
    """Held-out contexts of the CE and KL."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "DictionaryMetrics":
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise CircuitSAEError(f"an evaluation row lacks {', '.join(missing)}")
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass
class Evaluation:
    """What :func:`evaluate` measured: one :class:`DictionaryMetrics` per dictionary, by folder name.

    :meth:`to_json` is the content of ``eval.json``; ``path`` (where it was written) is not part of it.
    """

    model: str
    """The model the dictionaries were spliced into."""
    model_dtype: str
    """Its dtype."""
    results: dict[str, DictionaryMetrics]
    """Per dictionary, keyed by its folder's name, in the order evaluated."""
    path: "str | None" = None
    """The ``eval.json`` written or read (None for an evaluation not on disk)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_dtype": self.model_dtype,
            "results": {name: r.to_json() for name, r in self.results.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], path: "str | None" = None) -> "Evaluation":
        results = {name: DictionaryMetrics.from_json(r) for name, r in data["results"].items()}
        return cls(model=data["model"], model_dtype=data["model_dtype"], results=results, path=path)

    @classmethod
    def read(cls, path: "str | Path") -> "Evaluation":
        """The evaluation in an ``eval.json``."""
        return cls.from_json(json.loads(Path(path).read_text()), path=str(path))

    def write(self, path: "str | Path") -> None:
        """Write :meth:`to_json` to ``path`` (atomically) and remember it as :attr:`path`."""
        atomic_write(Path(path), json.dumps(self.to_json(), indent=1).encode())
        self.path = str(path)


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


def evaluate(
    config: "EvalConfig | None" = None, *, model: Any = None, progress: bool = True, **overrides: Any
) -> Evaluation:
    """Evaluate saved dictionaries; returns an :class:`Evaluation` and writes it as JSON (``eval.json``).

    The JSON file is checked to be writable, and its folder locked against other writers, before any work.
    """
    cfg = EvalConfig(**{**(vars(config) if config else {}), **overrides})
    folders = dictionary_folders(cfg.dictionaries)
    out = Path(cfg.out) if cfg.out else folders[0].parent / "eval.json"
    with lock_folder(out.parent, "evaluation"):
        probe_file(out)
        return _evaluate(cfg, folders, out, model, progress)


def held_out_stream(
    model: Any, recorded: Mapping[str, Any], sites: list[str], rows: int, contexts: int, progress: bool = False
) -> ModelStream:
    """A stream of the held-out split a dictionary trained from the model records (``meta["stream"]``): at least
    ``rows`` rows per site and ``contexts`` contexts, no training contexts."""
    try:
        per_context = int(recorded["ctx_len"]) - (0 if recorded["keep_bos"] else 1)
        return ModelStream(
            model,
            sites,
            tokens=0,
            corpus=str(recorded["corpus"]),
            ctx_len=int(recorded["ctx_len"]),
            seed=int(recorded["seed"]),
            heldout_fraction=float(recorded["heldout_fraction"]),
            heldout_rows=max(rows, contexts * per_context),
            keep_bos=bool(recorded["keep_bos"]),
            dtype=str(recorded["dtype"]),
            progress=progress,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CircuitSAEError(
            f"the dictionary's record of its training stream is incomplete ({e}): pass --store"
        ) from None


def _evaluate(cfg: EvalConfig, folders: list[Path], out: Path, model: Any, progress: bool) -> Evaluation:
    """:func:`evaluate` with its output checked and locked."""
    from circuitsae.models import dtype_name, load_model, model_name

    loaded = [(f, load_dictionary(f)) for f in folders]
    given = ActivationStore(cfg.store) if cfg.store else None
    # dictionaries trained from the model (no store), by their recorded stream settings
    streamed = {
        f: json.dumps(d.meta["stream"], sort_keys=True)
        for f, d in loaded
        if given is None and "stream" in d.meta and not d.meta.get("store")
    }
    stores: dict[str, ActivationStore] = {}  # by the path each store is read from
    store_of: dict[Path, str] = {}
    for folder, d in loaded:
        if folder in streamed:
            continue
        store = given or recorded_store(d.meta, folder, where=str(folder))
        store_of[folder] = os.path.normpath(store.root)
        stores.setdefault(store_of[folder], store)
    wanted = cfg.model or (
        next(iter(stores.values())).config["model"]
        if stores
        else next(d for f, d in loaded if f in streamed).meta["stream"]["model"]
    )
    if model is None:
        model = load_model(wanted, device=cfg.device, dtype=cfg.model_dtype)
    # their held-out rows and contexts come from forward passes over the held-out split of the corpus they were
    # trained on, one stream per recorded setting
    streams: dict[str, ModelStream] = {}
    for key in dict.fromkeys(streamed.values()):
        group = [d for f, d in loaded if streamed.get(f) == key]
        sites = sorted({d.meta["site"] for d in group})
        streams[key] = held_out_stream(model, group[0].meta["stream"], sites, cfg.rows, cfg.contexts, progress)
    store_of.update(streamed)
    samples: dict[str, dict[str, torch.Tensor]] = {}  # a stream's held-out rows, every site from one pass
    results: dict[str, dict] = {}
    by_store: dict[str, list[tuple[str, tuple[str, Any]]]] = {}  # store -> [(name, (site, dictionary))]
    for folder, d in loaded:
        store_path = store_of[folder]
        source: "ActivationStore | ModelStream" = stores.get(store_path) or streams[store_path]
        site = d.meta.get("site")
        if site is None or site not in source.sites:
            raise CircuitSAEError(f"{folder}: its site {site!r} is not in {source.describe()}")
        if not source.n_rows("heldout"):
            raise CircuitSAEError(
                f"store {store_path} has no held-out rows (harvested with --heldout-tokens 0): evaluate on a store "
                "that has some (--store)"
            )
        check_dictionary(model, site, d)  # on the site's device from here on: metrics are computed there
        if isinstance(source, ModelStream):
            if store_path not in samples:
                samples[store_path] = source.sample(source.sites, "heldout", cfg.rows)
            x = samples[store_path][site].to(torch.float32)
        else:
            x = source.activations(site, "heldout", max_rows=cfg.rows)
        rec = reconstruction(d, x)
        results[folder.name] = {
            "path": str(folder),
            "store": str(store_path) if isinstance(source, ActivationStore) else source.describe(),
            "architecture": d.architecture,
            "site": site,
            "d_dict": d.d_dict,
            "coefficient": d.meta.get("training", {}).get("coefficient"),
            **rec,
        }
        by_store.setdefault(store_path, []).append((folder.name, (site, d)))
    # loss recovered of each dictionary on the held-out text of its own store or stream (never its training text);
    # one model pass per store serves all of that store's dictionaries
    for store_path, members in by_store.items():
        source = stores.get(store_path) or streams[store_path]
        ids = (source.ids["heldout"] if isinstance(source, ModelStream) else source.tokens("heldout"))[: cfg.contexts]
        if ids.shape[0] == 0:
            raise CircuitSAEError(f"{source.describe()} has no held-out contexts to measure loss recovered on")
        for (name, _), fid in zip(members, fidelity(model, [p for _, p in members], ids, cfg.batch_size, progress)):
            results[name].update(fid)
    rows = {name: DictionaryMetrics.from_json(r) for name, r in results.items()}
    report = Evaluation(model=model_name(model), model_dtype=dtype_name(model), results=rows)
    report.write(out)
    return report


def format_table(results: "Evaluation | Mapping[str, DictionaryMetrics | Mapping[str, Any]]") -> str:
    """A plain-text table of the headline metrics, one row per dictionary.

    ``results``: an :class:`Evaluation`, or its rows by name (as :class:`DictionaryMetrics` or as the dicts of
    ``eval.json``'s ``results``).
    """
    rows_in = results.results if isinstance(results, Evaluation) else results
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
    for name, r in rows_in.items():
        r = r.to_json() if isinstance(r, DictionaryMetrics) else r
        rows.append([name] + [fmt.format(r[c]) if r.get(c) is not None else "-" for c, fmt in cols[1:]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join(
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in rows
    )
