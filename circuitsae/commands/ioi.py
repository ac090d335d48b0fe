"""``circuitsae ioi DICTIONARY ...``: the IOI feature-patching experiment (Cunningham et al. Fig. 3 and Fig. 17).

For every dictionary given (baseline SAEs, Gated SAEs, the α = 0 dictionary)
plus a PCA rotation fitted at each site, on the same IOI prompts: order the
features by ACDC (and, optionally, by attribution), and plot KL(patched ‖
target) against the number of features patched and against the mean edit
size. Each curve is kept as it finishes, and exact ACDC keeps its state after every threshold, so an
interrupted run resumes.

**Selection and evaluation on different prompts** (``heldout_prompts > 0``):
the orderings then choose their feature sets on prompts built from half of
the templates and half of the names (:func:`~circuitsae.circuits.curves.split_prompts`), and every
recorded set is also patched, unchanged, into prompts built from the other
templates and names (:func:`~circuitsae.circuits.curves.score_sets`); each curve gains a ``heldout``
record list. A circuit that works only on the prompts it was chosen on is not
the paper's claim.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from circuitsae.circuits.acdc import acdc, default_thresholds
from circuitsae.circuits.curves import feature_sets, halving, label, score_sets, split_prompts, transfer
from circuitsae.config import model_dtype_option, option, validate
from circuitsae.data.store import recorded_store
from circuitsae.dictionaries import Dictionary, PCADictionary, load_dictionary
from circuitsae.dictionaries.folders import dictionary_folders
from circuitsae.errors import CircuitSAEError, NothingToPatch
from circuitsae.io import atomic_write, digest, lock_folder, probe_folder
from circuitsae.models import dtype_name, input_device, load_model
from circuitsae.tasks.ioi import ioi_performance, make_ioi
from circuitsae.viz.plots import plot_curves, plot_transfer

NAME = "ioi"
HELP = "IOI feature patching with ACDC ordering: KL curves vs PCA and alpha=0"
DESCRIPTION = (
    "Patch dictionary features from counterfactual IOI prompts into base prompts, order them by ACDC "
    "(and attribution), and plot KL against features patched and edit magnitude (Cunningham et al. Fig. 3)."
)
EXAMPLES = (
    "examples:\n  circuitsae ioi runs/saes                       # every dictionary in a training folder, + PCA\n"
    "  circuitsae ioi runs/saes/resid.16-relu-c1 runs/saes/resid.16-relu-c0 --prompts 50 --out runs/ioi"
)


ENGINES = ("auto", "downstream", "hook")
#: IOI prompt pairs a run may ask for (each is a forward pass per evaluation)
MAX_PROMPTS = 100_000


@dataclass
class IOIConfig:
    """Feature patching on IOI with ACDC ordering, for several dictionaries."""

    dictionaries: tuple[str, ...] = option(
        (), "saved dictionary folders (or training output folders)", positional="DICTIONARY"
    )
    model: "str | None" = option(None, "model (default: the one the dictionaries were trained on)")
    prompts: int = option(50, "IOI prompt pairs", min=1, max=MAX_PROMPTS)
    seed: int = option(0, "seed of the prompts and of ACDC's visiting order", min=0, max=(1 << 63) - 1)
    thresholds: int = option(50, "ACDC thresholds τ, log-spaced over [1e-5, 1]", min=1, max=10_000)
    pca: bool = option(True, "add a PCA baseline per site, fitted on the dictionaries' activation store")
    pca_rows: int = option(200_000, "activations to fit PCA on", min=1, max=1 << 30)
    acdc: bool = option(True, "order by exact ACDC")
    acdc_dense: bool = option(
        True, "exact ACDC also for dense dictionaries (α = 0, PCA): every feature a candidate, slow on a CPU"
    )
    attribution: bool = option(True, "also order by attribution (one backward pass) and plot it beside ACDC")
    heldout_prompts: int = option(
        0,
        "also patch every chosen feature set into this many other prompts (the other half of the templates and "
        "names; the orderings then use the first half); 0: off",
        min=0,
        max=MAX_PROMPTS,
    )
    engine: str = option(
        "auto", "evaluator: auto, downstream (later layers only) or hook (full passes)", choices=ENGINES
    )
    out: str = option("runs/ioi", "output folder: kl_vs_patches.json and .png")
    device: "str | None" = option(None, "cpu, cuda, ... (default: cuda if available)")
    model_dtype: "str | None" = model_dtype_option()

    def __post_init__(self) -> None:
        validate(self)
        if not (self.acdc or self.attribution):
            raise CircuitSAEError("choose at least one ordering: ACDC or attribution")


@dataclass
class IOIRun:
    """What :func:`run_ioi` returns and writes as ``kl_vs_patches.json``: the prompts' IOI performance and one
    row per curve.

    Each row of ``results`` is a curve as ``acdc(...).to_json()`` gives it (``site``, ``method``, ``records``
    of ``{n_features, kl, kl_reverse, edit_magnitude, ...}``, ``start``: ``{"none", "all"}`` records — the
    unpatched run and every candidate patched —, ``order``, ``removed_at``, ``n_candidates``, ``evaluations``,
    ``seconds``) plus ``label``, ``path``, ``architecture``, ``d_dict`` and, with held-out prompts,
    ``heldout`` (:func:`~circuitsae.circuits.curves.score_sets`); :func:`~circuitsae.circuits.curves.halving`
    and :func:`~circuitsae.circuits.curves.transfer` read them.

    :meth:`to_json` writes exactly the keys ``circuitsae ioi`` has always written (not ``path``);
    :meth:`from_json` reads those files and other files of curves, such as
    ``benchmarks/results/kl_vs_patches.json``: keys it does not know stay in ``extra`` and are written back.
    """

    model: str
    """The model's name or path."""
    prompts: int
    """Selection prompts (IOI prompt pairs the orderings choose their features on)."""
    thresholds: "list[float] | int"
    """ACDC's τ grid (a count only, in files written by ``benchmarks/kl_vs_patches.py``)."""
    ioi: dict
    """The model's IOI performance on the selection prompts (:func:`~circuitsae.tasks.ioi.ioi_performance`)."""
    results: list[dict]
    """One row per curve (see above)."""
    skipped: list[dict] = field(default_factory=list)
    """Dictionaries with no feature that differs between base and target prompts: ``site, label, path, reason``."""
    seconds: "float | None" = None
    """Wall time of the run so far."""
    model_dtype: "str | None" = None
    """The model's dtype."""
    device: "str | None" = None
    """Where the model ran."""
    machine: "str | None" = None
    """The machine's name."""
    seed: "int | None" = None
    """Seed of the prompts and of ACDC's visiting order."""
    heldout_prompts: int = 0
    """Held-out prompts every chosen feature set is also scored on (0: none)."""
    ioi_heldout: "dict | None" = None
    """The IOI performance on the held-out prompts."""
    config: "dict | None" = None
    """The :class:`IOIConfig` the run used."""
    complete: bool = True
    """False while a run is still adding curves."""
    path: "str | None" = None
    """Where the JSON was written or read (not written into it)."""
    extra: dict = field(default_factory=dict)
    """Keys of a file that this type does not name, kept so that :meth:`to_json` writes them back."""

    _ORDER = ("model", "model_dtype", "device", "machine", "prompts", "seed", "thresholds", "ioi", "heldout_prompts",
              "ioi_heldout", "config", "results", "skipped", "seconds", "complete")  # fmt: skip

    def to_json(self) -> dict:
        """The JSON object, in the order and with the keys ``circuitsae ioi`` writes (plus ``extra``)."""
        return {**{k: getattr(self, k) for k in self._ORDER}, **self.extra}

    @classmethod
    def from_json(cls, data: "dict | str | Path", path: "str | None" = None) -> "IOIRun":
        """A run from its JSON object or file; files that lack the optional keys load with their defaults."""
        if not isinstance(data, dict):
            path = path or str(data)
            data = json.loads(Path(data).read_text())
        names = {f.name for f in fields(cls)} - {"path", "extra"}
        missing = {"model", "prompts", "thresholds", "ioi", "results"} - set(data)
        if missing:
            raise CircuitSAEError(f"{path or 'the IOI results'} lacks {sorted(missing)}: not an IOI run")
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        if known.get("heldout_prompts") is None:
            known["heldout_prompts"] = 0
        return cls(**known, path=path, extra=extra)

    def curves(self, site: "str | None" = None, method: "str | None" = None) -> list[dict]:
        """The curve rows at ``site`` and/or by ``method`` ("acdc", "attribution"); all by default."""
        return [r for r in self.results if site in (None, r["site"]) and method in (None, r["method"])]

    def halving(self) -> list[dict]:
        """:func:`~circuitsae.circuits.curves.halving` of every curve, computed from its records."""
        return [halving(r) for r in self.results]

    def transfer(self) -> list[dict]:
        """:func:`~circuitsae.circuits.curves.transfer` of every curve, computed from its records."""
        return [transfer(r) for r in self.results]


def _pca_for(site: str, dictionaries: list[Dictionary], rows: int) -> PCADictionary:

    recorded = [d for d in dictionaries if d.meta.get("store")]
    if not recorded:
        raise CircuitSAEError(f"cannot fit PCA at {site}: the dictionaries do not record their store (use --no-pca)")
    try:
        store = recorded_store(recorded[0].meta, recorded[0].folder, f"the dictionary at {site}")
    except CircuitSAEError as e:
        raise CircuitSAEError(f"cannot fit PCA at {site}: {e} (or use --no-pca)") from None
    pca = PCADictionary.fit(store, site=site, max_rows=rows)
    return pca


def _dense(d: Dictionary) -> bool:
    """PCA and the α = 0 dictionary: codes are dense, so every feature is a candidate."""
    return d.architecture == "pca" or d.meta.get("training", {}).get("coefficient") == 0


def _fingerprint(cfg: IOIConfig, path: str, d: Dictionary, thresholds: np.ndarray, dtype: str) -> str:
    """Names a finished curve by everything it depends on, so a changed setting is never served stale.

    A saved dictionary is identified by its files, one fitted here (PCA) by its weights; the model's dtype
    counts when it is not float32 (curves cached before dtypes were a choice were float32).
    """

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


def run_ioi(config: "IOIConfig | None" = None, *, model: Any = None, progress: bool = True, **overrides: Any) -> IOIRun:
    """Run the experiment; write ``kl_vs_patches.json`` and ``.png`` into ``config.out``; return the run.

    The output folder is locked against other writers and probed before anything loads.
    """
    cfg = IOIConfig(**{**(asdict(config) if config else {}), **overrides})
    with lock_folder(cfg.out, "ioi"):
        probe_folder(cfg.out)
        return _run_ioi(cfg, model, progress)


def _run_ioi(cfg: IOIConfig, model: Any, progress: bool) -> IOIRun:
    """:func:`run_ioi` in its locked folder."""
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

    def write(complete: bool = False) -> IOIRun:
        """JSON and PNG of the curves finished so far (after each one, so an interrupted run still shows them)."""
        report = IOIRun(
            model=str(getattr(getattr(model, "_module", model).config, "name_or_path", "")),
            model_dtype=dtype_name(model),
            device=str(input_device(model)),
            machine=platform.node() or "unknown",
            prompts=cfg.prompts,
            seed=cfg.seed,
            thresholds=[float(t) for t in thresholds],
            ioi=perf,
            heldout_prompts=cfg.heldout_prompts,
            ioi_heldout=perf_heldout,
            config=asdict(cfg),
            results=results,
            skipped=skipped,
            seconds=time.perf_counter() - t_all,
            complete=complete,
            path=str(Path(cfg.out) / "kl_vs_patches.json"),
        )
        atomic_write(parts.parent / "kl_vs_patches.json", json.dumps(report.to_json(), indent=1).encode())
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
    return write(complete=True)


Config = IOIConfig


def run(cfg: IOIConfig, *, model: Any = None, progress: bool = True) -> IOIRun:
    """The command's work: :func:`run_ioi`."""
    return run_ioi(cfg, model=model, progress=progress)


def show(report: IOIRun) -> str:
    """What ``circuitsae ioi`` prints."""
    ioi = report.ioi
    lines = [f"IOI on {report.prompts} prompts: logit diff {ioi['logit_diff']:.2f}, accuracy {ioi['accuracy']:.2f}"]
    for r in report.results:
        last = r["start"]["all"]
        lines.append(f"{r['site']} {r['label']:28s} {r['method']:11s} candidates {r['n_candidates']:5d}  "
                     f"KL all {last['kl']:.3g}  {r['seconds']:.0f} s")  # fmt: skip
    lines.append(f"wrote {report.path} and kl_vs_patches.png ({report.seconds:.0f} s)")
    return "\n".join(lines)
