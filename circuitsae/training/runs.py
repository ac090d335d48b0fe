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
from circuitsae.data.stream import ModelStream
from circuitsae.dictionaries import TrainableDictionary, registry
from circuitsae.memory import MemoryPlan
from circuitsae.sites import select
from circuitsae.training.config import STORE_SCALE_ROWS, TrainConfig

#: where a training reads its activations: a store, or the model's forward passes (the same reading interface)
Source = ActivationStore | ModelStream
SCALE_ROWS = STORE_SCALE_ROWS


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


def plan_runs(cfg: TrainConfig, source: Source) -> list[tuple[str, str, float]]:
    """The (site, arch, coefficient) of every run, in a fixed order."""
    sites = select(cfg.sites, source.sites, source.describe()) if cfg.sites else tuple(source.sites)
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
def input_scales(source: Source, sites: list[str], rows: int = SCALE_ROWS) -> dict[str, float]:
    """s = sqrt(d / E||x||²) per site over the first ``rows`` training rows (source order, deterministic), in
    float64; every site from the same pass over the source (one forward pass per chunk from a model)."""
    norms: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    for parts in source.samples(sites, "train", rows):
        for site, x in zip(sites, parts):
            norms[site].append(x.to(torch.float64).pow(2).sum(-1))
    return {site: math.sqrt(source.d / float(torch.cat(n).mean())) for site, n in norms.items()}


def input_scale(source: Source, site: str, rows: int = SCALE_ROWS) -> float:
    """:func:`input_scales` of one site."""
    return input_scales(source, [site], rows)[site]


def memory_plan(
    cfg: TrainConfig, d: int, plan: list[tuple[str, str, float]], n_sites: int, heldout_rows: int, itemsize: int = 4
) -> MemoryPlan:
    """What training ``plan`` on width-``d`` activations holds in memory at once, item by item.

    The SAEs are built on the ``meta`` device (no memory) to count their parameters exactly. Float32 weights,
    their gradients, Adam's two moments, and the checkpoint's serialised copy of weights and moments; the
    batches of every site (one in use, one read ahead); one run's step at a time (its codes, pre-activations and
    their gradients, ``4 · batch · d_dict`` floats); the held-out rows evaluated at the end (``itemsize`` bytes a
    value: the store's or the buffer's dtype). Training from the model adds its shuffle buffer (``buffer_rows``
    plus one chunk per site, the buffer dtype), the chunk being computed, and one forward pass (the sites' saved
    outputs and a generous ``4 · batch · ctx · (32·d + 16·ctx)`` bytes of temporaries, as a harvest plans); the
    model itself is loaded by then and not counted.
    """
    weights, widest = 0, 0
    for _site, arch, coef in plan:
        cls = registry.get_trainable(arch)
        with torch.device("meta"):
            sae = cls.for_training(d, coef, vars(cfg))
        weights += 4 * sum(t.numel() for t in itertools.chain(sae.parameters(), sae.buffers()))
        widest = max(widest, sae.d_dict)
    batch = 4 * cfg.batch_size * d * n_sites
    out = MemoryPlan(f"training {len(plan)} SAE{'s' * (len(plan) > 1)} on {n_sites} site(s) of width {d}").extend(
        [
            ("weights", weights),
            ("gradients", weights),
            ("optimiser state", 2 * weights),
            ("checkpoint copy", 3 * weights),
            ("batches", 2 * batch),
            ("one step", 4 * 4 * cfg.batch_size * widest),
            ("held-out rows", itemsize * heldout_rows * d * n_sites),
        ]
    )
    if cfg.streams:
        chunk = cfg.chunk_contexts * cfg.ctx_len * d * n_sites * itemsize
        out.extend(
            [
                ("shuffle buffer", cfg.buffer * d * n_sites * itemsize + chunk),
                ("chunk", chunk),
                (
                    "forward pass",
                    4 * cfg.model_batch * cfg.ctx_len * (d * n_sites + 32 * d + 16 * cfg.ctx_len),
                ),
            ]
        )
    return out


def make_run(cfg: TrainConfig, d: int, site: str, arch: str, coef: float, device: torch.device, index: int) -> Run:
    """Run ``index`` of the plan: its SAE for width-``d`` activations on ``device``, fused Adam where available,
    a generator of its own."""
    cls = registry.get_trainable(arch)
    sae: TrainableDictionary = cls.for_training(d, coef, vars(cfg))
    sae.to(device)
    lr = cfg.lr or cls.training.lr
    kwargs: dict[str, Any] = {"lr": lr, "betas": cls.training.betas}
    if device.type in ("cpu", "cuda"):
        kwargs["fused"] = True
    optimizer = torch.optim.Adam(sae.param_groups(), **kwargs)
    last_fired = torch.zeros(sae.d_dict, dtype=torch.long, device=device)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed + 1 + index)
    return Run(run_name(site, arch, coef), site, arch, coef, lr, sae, optimizer, last_fired, generator)
