"""``circuitsae feature SITE:ID``: what one dictionary feature reads and writes (Cunningham et al. Fig. 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from circuitsae.circuits.features import FeatureReport, analyse_feature
from circuitsae.config import model_dtype_option, option, validate
from circuitsae.data.store import ActivationStore, recorded_store
from circuitsae.dictionaries.folders import select_dictionaries
from circuitsae.errors import CircuitSAEError
from circuitsae.io import lock_folder, probe_folder
from circuitsae.models import load_model
from circuitsae.sites import parse_target
from circuitsae.viz.plots import write_feature_report

NAME = "feature"
HELP = "what one dictionary feature reads and writes: contexts, histogram, logit effect"
DESCRIPTION = (
    "Top and random contexts of a feature, its token histogram by activation range, the next-token "
    "log-probs its ablation moves and the tokens its direction unembeds to (Cunningham et al. Fig. 4)."
)
EXAMPLES = (
    "examples:\n  circuitsae feature resid.4:123 --dictionaries runs/saes --arch gated --out runs/feature\n"
    "  circuitsae feature resid.4:123 --dictionaries runs/saes/resid.4-relu-c1 --contexts 20 --split heldout"
)


@dataclass
class FeatureConfig:
    """``circuitsae feature SITE:ID``: input and output side of one feature."""

    target: str = option("", "SITE:FEATURE, e.g. resid.4:123", positional="SITE:ID")
    dictionaries: tuple[str, ...] = option((), "dictionary folders or a training output folder")
    arch: "str | None" = option(None, "keep only dictionaries of this architecture (relu, gated, ...)")
    coefficient: "float | None" = option(None, "keep only dictionaries trained with this sparsity coefficient", min=0)
    store: "str | None" = option(None, "activation store (default: the one the dictionary was trained on)")
    model: "str | None" = option(None, "model (default: the one the dictionary was trained on)")
    contexts: int = option(10, "top and random contexts to show and to measure the logit effect on", min=1, max=100_000)
    split: str = option("train", "store split to read: train or heldout", choices=("train", "heldout"))
    out: str = option("runs/feature", "output folder: JSON and PNGs")
    device: "str | None" = option(None, "cpu, cuda, ... (default: cuda if available)")
    model_dtype: "str | None" = model_dtype_option()

    def __post_init__(self) -> None:
        validate(self)
        if not self.dictionaries:
            raise CircuitSAEError("name the dictionaries with --dictionaries")


def run_feature(cfg: FeatureConfig, model: Any = None, progress: bool = True) -> FeatureReport:
    """Load what ``cfg`` names, analyse the feature and write the report into ``cfg.out``.

    ``cfg.out`` is locked against other writers and probed before anything loads.
    """
    with lock_folder(cfg.out, "feature"):
        probe_folder(cfg.out)
        return _run_feature(cfg, model, progress)


def _run_feature(cfg: FeatureConfig, model: Any, progress: bool) -> FeatureReport:
    """:func:`run_feature` with its folder locked."""
    site, feature = parse_target(cfg.target)
    dicts = select_dictionaries(cfg.dictionaries, cfg.arch, cfg.coefficient)
    if site not in dicts:
        raise CircuitSAEError(f"no dictionary at {site}: the dictionaries given are at {', '.join(dicts)}")
    d = dicts[site]
    store = ActivationStore(cfg.store) if cfg.store else recorded_store(d.meta, d.folder, f"the dictionary at {site}")
    name = cfg.model or d.meta.get("model", "smollm2-135m")
    model = model or load_model(name, device=cfg.device, dtype=cfg.model_dtype)
    report = analyse_feature(model, d, store, feature, site, k=cfg.contexts, split=cfg.split, progress=progress)
    write_feature_report(report, cfg.out)
    return report


Config = FeatureConfig


def run(cfg: FeatureConfig, *, model: Any = None, progress: bool = True) -> FeatureReport:
    """The command's work: :func:`run_feature`."""
    return run_feature(cfg, model, progress)


def show(report: FeatureReport) -> str:
    """What ``circuitsae feature`` prints."""
    return report.summary() + "\nwrote " + ", ".join(report.paths.values())
