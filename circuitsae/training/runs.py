"""The runs of one training pass: which (site, architecture, coefficient) train, and each run's SAE and optimiser.

Every run is built from :mod:`circuitsae.dictionaries.registry`: the class's ``for_training``, its lr and Adam
betas, and a resampling generator of its own (seeded by the run's index in :func:`plan_runs`'s order).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch

from circuitsae.data.store import ActivationStore
from circuitsae.dictionaries import TrainableDictionary, registry
from circuitsae.memory import MemoryPlan
from circuitsae.sites import select
from circuitsae.training.config import TrainConfig

SCALE_ROWS = 1 << 17


@dataclass
class Run:
    """One SAE being trained: its dictionary, optimiser and bookkeeping."""

    name: str
    site: str
    arch: str
    coefficient: float
    lr: float
    sae: TrainableDictionary
    optimizer: torch.optim.Optimizer
    last_fired: torch.Tensor  # [d_sae] step at which each feature last fired
    generator: torch.Generator  # draws this run's resampling inputs (CPU), one per run: runs split across ranks
    # draw what they would draw in one process


def plan_runs(cfg: TrainConfig, store: ActivationStore) -> list[tuple[str, str, float]]:
    """The (site, arch, coefficient) of every run, in a fixed order."""
    sites = select(cfg.sites, store.sites, f"store {store.root}") if cfg.sites else tuple(store.sites)
    runs = []
    per_arch = cfg.per_arch_coefficients()
    for site, arch in itertools.product(sites, cfg.arch):
        defaults = registry.get_trainable(arch).training
        for c in per_arch.get(arch) or cfg.coefficients or (defaults.coefficient,):  # TrainConfig checked them
            runs.append((site, arch, float(c)))
    return runs


def run_name(site: str, arch: str, coefficient: float) -> str:
    """Folder name of one trained SAE: ``<site>-<arch>-c<coefficient>``, e.g. ``resid.4-gated-c2``."""
    return f"{site}-{arch}-c{coefficient:g}"


@torch.no_grad()
def input_scale(store: ActivationStore, site: str) -> float:
    """s = sqrt(d / E||x||²) over up to ``SCALE_ROWS`` training rows (store order, deterministic)."""
    x = store.activations(site, "train", max_rows=SCALE_ROWS, dtype=torch.float64)
    return math.sqrt(store.d / float(x.pow(2).sum(-1).mean()))


def memory_plan(
    cfg: TrainConfig, d: int, plan: list[tuple[str, str, float]], n_sites: int, heldout_rows: int
) -> MemoryPlan:
    """What training ``plan`` on width-``d`` activations holds in memory at once, item by item.

    The SAEs are built on the ``meta`` device (no memory) to count their parameters exactly. Float32 weights,
    their gradients, Adam's two moments, and the checkpoint's serialised copy of weights and moments; the
    batches of every site (one in use, one read ahead); one run's step at a time (its codes, pre-activations and
    their gradients, ``4 · batch · d_dict`` floats); the held-out rows evaluated at the end.
    """
    weights, widest = 0, 0
    for _site, arch, coef in plan:
        cls = registry.get_trainable(arch)
        with torch.device("meta"):
            sae = cls.for_training(d, coef, vars(cfg))
        weights += 4 * sum(t.numel() for t in itertools.chain(sae.parameters(), sae.buffers()))
        widest = max(widest, sae.d_dict)
    batch = 4 * cfg.batch_size * d * n_sites
    return MemoryPlan(f"training {len(plan)} SAE{'s' * (len(plan) > 1)} on {n_sites} site(s) of width {d}").extend(
        [
            ("weights", weights),
            ("gradients", weights),
            ("optimiser state", 2 * weights),
            ("checkpoint copy", 3 * weights),
            ("batches", 2 * batch),
            ("one step", 4 * 4 * cfg.batch_size * widest),
            ("held-out rows", 4 * heldout_rows * d * n_sites),
        ]
    )


def make_run(
    cfg: TrainConfig, store: ActivationStore, site: str, arch: str, coef: float, device: torch.device, index: int
) -> Run:
    """Run ``index`` of the plan: its SAE on ``device``, fused Adam where available, a generator of its own."""
    cls = registry.get_trainable(arch)
    sae: TrainableDictionary = cls.for_training(store.d, coef, vars(cfg))
    sae.to(device)
    lr = cfg.lr or cls.training.lr
    kwargs: dict[str, Any] = {"lr": lr, "betas": cls.training.betas}
    if device.type in ("cpu", "cuda"):
        kwargs["fused"] = True
    optimizer = torch.optim.Adam(sae.param_groups(), **kwargs)
    last_fired = torch.zeros(sae.d_dict, dtype=torch.long, device=device)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed + 1 + index)
    return Run(run_name(site, arch, coef), site, arch, coef, lr, sae, optimizer, last_fired, generator)
