"""Train many SAEs in one pass over an activation store.

Every batch is read once and fed to every run — sites × architectures ×
sparsity coefficients — so a sweep costs one read of the data, not one per SAE.

Per step and run (x already scaled, see below)::

    L = loss(x; coefficient · min(1, step / coef_warmup_steps))      REFERENCE §1–2
    g_W ← g_W − (g_W · f) f          for each unit-norm feature row f (parallel part removed)
    Adam step with lr · min(1, step / lr_warmup_steps)
    f ← f / ||f||                     rows renormalised

**Input scale.** Each site's activations are multiplied by one scalar
``s = sqrt(d / E||x||²)`` (estimated on up to 2^17 training rows) so that
E||s·x||² = d and a sparsity coefficient means the same at every layer and in
every model. At save ``s`` is folded into the biases (see
``Dictionary.fold_input_scale``): saved dictionaries take raw activations.

**Default hyperparameters** (from the papers; override per run or flag):

- ``relu``: Adam(lr 1e-3, β = (0.9, 0.999)) — Cunningham et al. App. B.
- ``gated``: Adam(lr 3e-4, β = (0, 0.999)) — Rajamanoharan et al. App. D.
- ``topk``, ``batchtopk``: Adam(lr 5e-4, β = (0.9, 0.999)); the coefficient is k
  (features per token); the auxiliary loss sees latents that have not fired for
  10M tokens (Gao et al.) or a tenth of training, whichever is shorter.
- ``jumprelu``: Adam(lr 3e-4, β = (0, 0.999)) — Rajamanoharan et al. 2024b; the
  coefficient is λ of the L0 penalty; log θ learns 100× faster (see ``JumpReLUSAE``).
- coefficients: each class's ``training.coefficient`` (α for relu, λ for gated and jumprelu,
  k for topk and batchtopk), chosen for scaled activations by the sweep in
  ``benchmarks/pareto.py`` (mid-frontier).
- warm-up: lr over the first 1% of steps, coefficient over the first 5% (k is not warmed up).

**Dead-feature resampling** (Bricken et al. 2023, "Towards Monosemanticity"; relu and gated runs
only — TopK and BatchTopK revive dead latents with their auxiliary loss, JumpReLU trains without):
every ``resample_every`` steps (default: every quarter of training, skipped
when a quarter is under 50 steps; until 80% of training), features that have
not fired in that window are re-initialised: the decoder row becomes a training
input from the current batch, drawn with probability ∝ the *square* of its
loss ||x − x̂||² (Bricken et al.: "proportional to the square of the
autoencoder loss", i.e. ∝ ||x − x̂||⁴), minus b_dec, normalised; the encoder (gate) row becomes
that direction × 0.2 × the mean norm of live encoder rows; their biases are
zeroed and the Adam moments of all those rows reset.

**Checkpoints and resume.** Every ``checkpoint_every`` steps all runs'
weights, optimiser moments, dead-feature counters and RNG state are written
atomically to ``out/checkpoint.pt``. Re-running the same command resumes
exactly: the batch stream skips the batches already seen and the JSONL log is
cut back to the checkpoint, so the result equals an uninterrupted run.
A non-finite loss stops training with the last good checkpoint kept.
Checkpoints are read onto the CPU and each piece goes where it lives (weights
and moments to the training device, the sampling generator stays on the CPU),
so a run saved on one device resumes on another.

**Several processes** (``torchrun --nproc_per_node N -m circuitsae train ...``, see
:mod:`circuitsae.distributed`). ``parallel="data"`` (the default): every rank trains every run on its
contiguous share of each global batch (``batch_size`` must divide by the world size); after the backward
passes one all-reduce sums every run's gradients, which features fired and the losses; the gradients are
averaged, so every rank takes the same optimiser step and the parameters stay identical (checked at the end).
Resampling gathers the whole batch and its losses on every rank; rank 0 draws the rows and broadcasts them.
Only rank 0 writes the checkpoint, the log and the saved dictionaries, and every rank resumes from that
checkpoint (the same global batches whatever the world size, so another world size resumes the same training
up to floating-point rounding, with a note). ``parallel="runs"``: the runs are split across ranks
(run i on rank i mod N), with no communication; each rank keeps its own checkpoint, log and ``train.json``
(``-rank{r}of{N}``), and resuming needs the same N. Each run draws its resampling rows from a generator of
its own, so a run trains the same alone, among others or on another rank.

**Device and precision.** Everything a run owns (weights, optimiser moments,
dead-feature counters, the batches) lives on the training device; held-out
metrics are computed there too. ``autocast`` (default: on for CUDA, off for
the CPU) runs each training step under bfloat16 autocast for that device type
(``torch.autocast(device.type)``), so the same path runs on the CPU in the
tests. Weights and Adam moments stay float32. Under autocast the losses go
through plain autograd (``loss_reference``): the hand-written backward passes
of :mod:`circuitsae.dictionaries.fused` are float32 only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from circuitsae import distributed
from circuitsae.config import option
from circuitsae.data.store import ActivationStore
from circuitsae.dictionaries import Dictionary, TrainableDictionary, registry
from circuitsae.errors import CircuitSAEError
from circuitsae.io import atomic_write
from circuitsae.models import resolve_device
from circuitsae.training.evaluate import reconstruction

# Which architectures train, their lr, Adam betas, default coefficient, whether it is k, and whether dead features
# are resampled: each class declares them (``training``, ``resamples_dead``, ``for_training``) and the trainer
# asks :mod:`circuitsae.dictionaries.registry`. relu/gated defaults give L0 ≈ 75 and ≈ 55 at SmolLM2 resid.6
# (pareto.json); topk/batchtopk: k; jumprelu: λ of the L0 penalty.

#: TopK's auxiliary loss: a latent is dead when it has not fired for this many tokens (Gao et al.: 10M) or a
#: tenth of training, whichever is shorter
AUX_DEAD_TOKENS = 10_000_000
SCALE_ROWS = 1 << 17
PARALLEL_MODES = ("data", "runs")
MIN_RESAMPLE_WINDOW = 50  # steps; the default schedule does not resample over shorter windows


class TrainingDiverged(CircuitSAEError):
    """A run's loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """One training pass: every (site, architecture, coefficient) combination is a run."""

    store: str = option("runs/acts", "activation store folder (from `circuitsae harvest`)")
    out: str = option("runs/saes", "output folder: one sub-folder per trained SAE, plus checkpoint and log")
    sites: tuple[str, ...] = option((), "sites to train on (default: every site in the store)")
    # checked against the registry in __post_init__ (not argparse choices: a bad name gets the same one-line error
    # from the API and the command line, and a class registered later is accepted)
    arch: tuple[str, ...] = option(
        ("relu", "gated"), "architectures: relu (Cunningham et al.), gated, topk, batchtopk, jumprelu (any of them)"
    )
    coefficients: tuple[float, ...] = option(
        (),
        "sparsity coefficients: α for relu, λ for gated and jumprelu, k (features per token) for topk and "
        "batchtopk; one run each per architecture (default: the per-arch default)",
    )
    arch_coefficients: tuple[str, ...] = option(
        (),
        "per-architecture coefficients, ARCH=C1,C2,... (e.g. topk=32,64 jumprelu=0.3): those architectures "
        "take these instead of --coefficients, so a relu sweep and a TopK sweep train in one pass",
    )
    expansion: float = option(8.0, "dictionary size as a multiple of d for every run but gated (d_sae = expansion·d)")
    gated_expansion: "float | None" = option(
        None, "expansion for gated runs (default: same as relu; the Gated paper uses 3/4 for equal compute)"
    )
    tied: bool = option(False, "relu: tie encoder and decoder (with --no-decoder-bias: Cunningham et al.'s exact form)")
    decoder_bias: bool = option(
        True,
        "relu: learn b_dec, subtracted before the encoder and added after the decoder (the Gated paper's baseline)",
    )
    lr: "float | None" = option(
        None, "learning rate (default: 1e-3 relu, 3e-4 gated, the papers'; for short runs 1e-3 suits both)"
    )
    batch_size: int = option(4096, "activations per step")
    epochs: int = option(1, "passes over the training split")
    lr_warmup: float = option(0.01, "fraction of steps over which the learning rate ramps up linearly")
    coef_warmup: float = option(0.05, "fraction of steps over which the sparsity coefficient ramps up linearly")
    resample_every: int = option(
        0, "resample dead features every N steps (0: every quarter of training if that is >= 50 steps; -1: never)"
    )
    checkpoint_every: int = option(200, "steps between checkpoints")
    log_every: int = option(25, "steps between log lines (JSONL) and divergence checks")
    eval_rows: int = option(65536, "held-out activations used for the final L0/FVU/γ of each run")
    device: "str | None" = option(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    autocast: "bool | None" = option(
        None, "train under bfloat16 autocast (default: on for CUDA, off for the CPU; weights stay float32)"
    )
    seed: int = option(0, "seed for initialisation, batch order and resampling")
    stop_after: "int | None" = option(None, "stop (with a checkpoint) after this many steps; re-run to continue")
    parallel: str = option(
        "data",
        "with several processes (torchrun): data (each rank trains every run on its share of every batch) "
        "or runs (the runs are split across ranks, no communication)",
    )

    def __post_init__(self) -> None:
        unknown = [a for a in self.arch if a not in registry.TRAINABLE_NAMES]
        if unknown or not self.arch:
            raise CircuitSAEError(
                f"unknown architecture {unknown or '(none)'}: choose from {', '.join(registry.TRAINABLE_NAMES)}"
            )
        if any(c < 0 for c in self.coefficients):
            raise CircuitSAEError("sparsity coefficients must be >= 0")
        self.arch_coefficients = tuple(str(a) for a in self.arch_coefficients)
        for arch, values in self.per_arch_coefficients().items():
            if arch not in self.arch:
                raise CircuitSAEError(
                    f"--arch-coefficients names {arch}, which is not among the architectures trained "
                    f"({', '.join(self.arch)})"
                )
            if any(c < 0 for c in values):
                raise CircuitSAEError("sparsity coefficients must be >= 0")
        for name in ("batch_size", "epochs", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise CircuitSAEError(f"{name} must be >= 1")
        if self.expansion <= 0 or (self.gated_expansion is not None and self.gated_expansion <= 0):
            raise CircuitSAEError("expansion must be > 0")
        if self.parallel not in PARALLEL_MODES:
            raise CircuitSAEError(f"unknown --parallel {self.parallel!r}: use {' or '.join(PARALLEL_MODES)}")
        if self.lr is not None and self.lr <= 0:
            raise CircuitSAEError("lr must be > 0")
        if not (0 <= self.lr_warmup <= 1 and 0 <= self.coef_warmup <= 1):
            raise CircuitSAEError("lr_warmup and coef_warmup are fractions of training in [0, 1]")
        self.sites, self.arch = tuple(self.sites), tuple(self.arch)
        # one canonical type per field, so an API call and the same CLI command resume each other
        self.expansion, self.lr_warmup, self.coef_warmup = (
            float(self.expansion),
            float(self.lr_warmup),
            float(self.coef_warmup),
        )
        self.gated_expansion = None if self.gated_expansion is None else float(self.gated_expansion)
        self.lr = None if self.lr is None else float(self.lr)
        self.coefficients = tuple(float(c) for c in self.coefficients)

    def per_arch_coefficients(self) -> dict[str, tuple[float, ...]]:
        """``arch_coefficients`` parsed: architecture -> its coefficients."""
        out: dict[str, tuple[float, ...]] = {}
        for spec in self.arch_coefficients:
            arch, sep, values = spec.partition("=")
            try:
                parsed = tuple(float(v) for v in values.split(",")) if sep and values else None
            except ValueError:
                parsed = None
            if parsed is None or arch not in registry.TRAINABLE_NAMES or arch in out:
                raise CircuitSAEError(
                    f"--arch-coefficients {spec!r}: write ARCH=C1,C2,... once per architecture, ARCH one of "
                    f"{', '.join(registry.TRAINABLE_NAMES)}"
                )
            out[arch] = parsed
        return out

    def fingerprint(self) -> str:
        """What must match for a checkpoint to be resumed (not out/device/precision/stop_after/logging)."""
        skip = ("out", "device", "autocast", "stop_after", "log_every", "parallel")
        keep = {k: v for k, v in asdict(self).items() if k not in skip}
        if not keep["arch_coefficients"]:  # absent from older versions' checkpoints: unused, they still resume
            del keep["arch_coefficients"]
        return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


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
    sites = cfg.sites or tuple(store.sites)
    for s in sites:
        if s not in store.sites:
            raise CircuitSAEError(f"site {s} is not in store {store.root} (it has {', '.join(store.sites)})")
    runs = []
    per_arch = cfg.per_arch_coefficients()
    for site, arch in itertools.product(sites, cfg.arch):
        defaults = registry.get_trainable(arch).training
        for c in per_arch.get(arch) or cfg.coefficients or (defaults.coefficient,):
            if defaults.k and (c != int(c) or c < 1):
                raise CircuitSAEError(f"{arch}: the coefficient is k, the features kept per token: a whole number "
                                      f">= 1, not {c:g}")  # fmt: skip
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


def _make_run(
    cfg: TrainConfig, store: ActivationStore, site: str, arch: str, coef: float, device: torch.device, index: int
) -> Run:
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


class Trainer:
    """Owns the runs, the schedule and the checkpoint; :meth:`fit` is a short loop over :meth:`step`."""

    def __init__(self, cfg: TrainConfig, progress: bool = True) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.world = distributed.init(self.device.type)
        if self.world.active and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.world.local_rank)
        self.data_parallel = self.world.active and cfg.parallel == "data"
        self.progress = progress and self.world.main
        self.store = distributed.on_every_rank(lambda: ActivationStore(cfg.store), "opening the store")
        if self.store.n_rows("train") == 0:
            raise CircuitSAEError(f"store {self.store.root} has no training activations")
        if self.data_parallel and cfg.batch_size % self.world.size:
            raise CircuitSAEError(
                f"--batch-size {cfg.batch_size} is not divisible by the {self.world.size} ranks: each rank takes an "
                f"equal share of every batch (use a multiple of {self.world.size})"
            )
        self.out = Path(cfg.out)
        self.plan = plan_runs(cfg, self.store)
        self.sites = sorted({s for s, _, _ in self.plan}, key=self.store.sites.index)
        self.total_steps = self.store.n_batches(cfg.batch_size, epochs=cfg.epochs, drop_last=True)
        if self.total_steps < 1:
            raise CircuitSAEError(
                f"store {self.store.root} has {self.store.n_rows('train')} training rows, fewer than one batch "
                f"of {cfg.batch_size}: harvest more tokens or lower --batch-size"
            )
        self.lr_warmup_steps = max(1, round(cfg.lr_warmup * self.total_steps))
        self.coef_warmup_steps = max(1, round(cfg.coef_warmup * self.total_steps))
        # Dead = not fired for ``dead_window`` steps. The default schedule resamples every quarter
        # of training, but only when a quarter is at least MIN_RESAMPLE_WINDOW steps: over a
        # shorter window "dead" means little, and early resampled features (b_dec not yet learned)
        # all point along the data mean, fire on every input and blow up the reconstruction.
        self.dead_window = cfg.resample_every if cfg.resample_every > 0 else max(1, self.total_steps // 4)
        self.resample_every = (
            None
            if cfg.resample_every < 0 or (cfg.resample_every == 0 and self.dead_window < MIN_RESAMPLE_WINDOW)
            else self.dead_window
        )
        # TopK's auxiliary loss sees latents not fired for AUX_DEAD_TOKENS tokens or a tenth of training
        self.aux_dead_steps = max(1, min(math.ceil(AUX_DEAD_TOKENS / cfg.batch_size), self.total_steps // 10))
        self.autocast = self.device.type == "cuda" if cfg.autocast is None else bool(cfg.autocast)
        torch.manual_seed(cfg.seed)
        self.scales = {s: input_scale(self.store, s) for s in self.sites}
        self.runs = [_make_run(cfg, self.store, s, a, c, self.device, i) for i, (s, a, c) in enumerate(self.plan)]
        if self.world.active and cfg.parallel == "runs":  # every rank made every run (same RNG), keeps its own
            if len(self.runs) < self.world.size:
                raise CircuitSAEError(
                    f"--parallel runs splits {len(self.runs)} runs across {self.world.size} ranks: "
                    f"use at most {len(self.runs)} processes"
                )
            self.runs = self.runs[self.world.rank :: self.world.size]
        self.part = (self.world.rank, self.world.size) if self.data_parallel else (0, 1)
        self.allreduce_bytes = 0  # per step, data-parallel
        self.resampled: dict[str, int] = {}  # features resampled per run (this session)
        self.step_count = 0
        self.last_good = 0

    # -- schedule ---------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        return min(1.0, (step + 1) / self.lr_warmup_steps)

    def coef_factor(self, step: int) -> float:
        return min(1.0, (step + 1) / self.coef_warmup_steps)

    # -- one step -------------------------------------------------------------------
    def step(self, batch: dict[str, torch.Tensor]) -> list[Any]:
        """One optimiser step of every run on the same rows; returns each run's Loss (detached).

        Data-parallel, ``batch`` is this rank's share; one all-reduce then averages every run's
        gradients (and combines which features fired, and the losses) before any optimiser step.
        """
        k = self.step_count
        losses, fired = [], []
        for run in self.runs:
            x = batch[run.site].to(self.device)  # a no-op for the trainer's own batches
            for g in run.optimizer.param_groups:
                g["lr"] = run.lr * self.lr_factor(k) * g.get("lr_scale", 1.0)
            run.sae.set_dead(run.last_fired <= k - self.aux_dead_steps)  # the same on every rank
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = run.sae.loss(x, run.coefficient * self.coef_factor(k))
            run.optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            losses.append(type(loss)(*(None if t is None else t.detach() for t in loss)))
            fired.append(loss.codes.amax(0) > 0)  # codes are >= 0 for every architecture
        if self.data_parallel:
            losses, fired = self._all_reduce(losses, fired)
        for run, f in zip(self.runs, fired):
            _remove_parallel_grad(run.sae)
            run.optimizer.step()
            _renormalise(run.sae)
            run.last_fired.masked_fill_(f, k + 1)
        for run, loss in zip(self.runs, losses):
            run.sae.after_step(loss.stat)  # BatchTopK: its threshold's running mean
        self.step_count += 1
        if self.resample_every and self.step_count % self.resample_every == 0:
            if self.step_count < 0.8 * self.total_steps:
                for run, loss in zip(self.runs, losses):
                    if not run.sae.resamples_dead:  # TopK and BatchTopK have their auxiliary loss instead
                        continue
                    self.resampled[run.name] = self.resampled.get(run.name, 0) + self._resample(
                        run, batch[run.site], loss
                    )
        return losses

    @torch.no_grad()
    def _all_reduce(self, losses: list[Any], fired: list[torch.Tensor]) -> tuple[list[Any], list[torch.Tensor]]:
        """One all-reduce per step: every run's gradients (averaged), fired flags (any rank) and losses (mean)."""
        grads = [p.grad for run in self.runs for p in run.sae.parameters() if p.grad is not None]
        totals = torch.stack([loss.total.float() for loss in losses])
        # BatchTopK's threshold statistic: its mean over ranks updates θ, so θ stays the same on every rank
        stats = torch.stack([(loss.stat if loss.stat is not None else totals.new_zeros(())).float() for loss in losses])
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [f.float() for f in fired] + [totals, stats])
        self.allreduce_bytes = flat.numel() * flat.element_size()
        distributed.all_reduce_sum_(flat, f"training step {self.step_count + 1}")
        flat.div_(self.world.size)
        at = 0
        for g in grads:
            g.copy_(flat[at : at + g.numel()].view_as(g))
            at += g.numel()
        combined = []
        for f in fired:
            combined.append(flat[at : at + f.numel()] > 0)
            at += f.numel()
        n = len(losses)
        mean, stat = flat[at : at + n], flat[at + n : at + 2 * n]
        return [
            loss._replace(total=mean[i], stat=None if loss.stat is None else stat[i]) for i, loss in enumerate(losses)
        ], combined

    @torch.no_grad()
    def _resample(self, run: Run, x: torch.Tensor, loss: Any) -> int:
        dead = (run.last_fired <= self.step_count - self.dead_window).nonzero().squeeze(1)
        if dead.numel() == 0:  # the same on every rank: which features fired is combined every step
            return 0
        x = x.float()
        err = (loss.x_hat.float() - x).pow(2).sum(-1)
        if self.data_parallel:  # the whole batch on every rank; rank 0 draws, every rank takes its rows
            x, err = distributed.all_gather_cat(x), distributed.all_gather_cat(err)
        err = err.cpu().double()
        weights = err.pow(2) if float(err.sum()) > 0 else torch.ones_like(err)
        if self.world.main or not self.data_parallel:
            rows = torch.multinomial(weights, dead.numel(), replacement=True, generator=run.generator)
        else:
            rows = torch.empty(dead.numel(), dtype=torch.long, device="cpu")
        rows = rows.to(x.device)
        if self.data_parallel:
            distributed.broadcast_(rows, f"resampling at step {self.step_count}")
        touched = run.sae.resample(dead, x[rows])
        for p, idx in touched:
            state = run.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][idx] = 0.0
        run.last_fired[dead] = self.step_count
        return int(dead.numel())

    # -- checkpoint ---------------------------------------------------------------------
    @property
    def _rank_suffix(self) -> str:
        """Run-parallel ranks keep files of their own; data-parallel ranks share rank 0's."""
        if self.world.active and not self.data_parallel:
            return f"-rank{self.world.rank}of{self.world.size}"
        return ""

    @property
    def writes(self) -> bool:
        """Whether this process writes checkpoints, logs and saved dictionaries (data-parallel: rank 0 only)."""
        return self.world.main or not self.data_parallel

    @property
    def checkpoint_path(self) -> Path:
        return self.out / f"checkpoint{self._rank_suffix}.pt"

    def save_checkpoint(self) -> None:
        """Write every run's state atomically; refuses (TrainingDiverged) if a weight is not finite."""
        for run in self.runs:
            if not all(bool(torch.isfinite(p).all()) for p in run.sae.parameters()):
                raise TrainingDiverged(
                    f"run {run.name} has non-finite weights at step {self.step_count}; the last good checkpoint "
                    f"(step {self.last_good}) is kept in {self.checkpoint_path}: lower the learning rate "
                    f"(--lr, now {run.lr:g}) or the coefficient (now {run.coefficient:g})"
                )
        self.last_good = self.step_count
        if not self.writes:
            return
        state = {
            "fingerprint": self.cfg.fingerprint(),
            "step": self.step_count,
            "scales": self.scales,
            "world_size": self.world.size,
            "parallel": self.cfg.parallel if self.world.active else None,
            "runs": [
                {
                    "name": r.name,
                    "sae": r.sae.state_dict(),
                    "optimizer": r.optimizer.state_dict(),
                    "last_fired": r.last_fired,
                    "generator": r.generator.get_state(),
                }
                for r in self.runs
            ],
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(self.checkpoint_path, buf.getvalue())

    def load_checkpoint(self) -> bool:
        if self.out.is_dir():  # run-parallel checkpoints of another world size: their runs would start over
            mine = f"of{self.world.size}.pt" if self._rank_suffix else None
            others = sorted(
                p.name for p in self.out.glob("checkpoint-rank*of*.pt") if not (mine and p.name.endswith(mine))
            )
            if others:
                raise CircuitSAEError(
                    f"{self.out} holds run-parallel checkpoints of another number of ranks ({others[0]}): the runs "
                    "are split by rank, so resume with that many processes, or use another --out"
                )
        if not self.checkpoint_path.is_file():
            return False
        # on the CPU first: the generator's state must stay there, and each tensor is then copied where it lives
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.cfg.fingerprint():
            raise CircuitSAEError(
                f"{self.checkpoint_path} belongs to a different training command; use another --out "
                f"or delete the checkpoint to start over"
            )
        if any("generator" not in saved for saved in state["runs"]):
            raise CircuitSAEError(
                f"{self.checkpoint_path} was written by an older circuitsae (one resampling generator for all "
                "runs): delete it to start over, or finish that training with the version that wrote it"
            )
        written_by = int(state.get("world_size", 1))
        if written_by != self.world.size and self.world.main:
            print(
                f"note: resuming a checkpoint written by {written_by} process(es) with {self.world.size}: the same "
                "global batches, so the same training up to floating-point rounding",
                file=sys.stderr,
            )
        self.step_count = self.last_good = int(state["step"])
        self.scales = state["scales"]
        for run, saved in zip(self.runs, state["runs"]):
            run.sae.load_state_dict(saved["sae"])
            run.optimizer.load_state_dict(saved["optimizer"])
            run.last_fired.copy_(saved["last_fired"])
            run.generator.set_state(saved["generator"])
        return True

    # -- logging ------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.out / f"log{self._rank_suffix}.jsonl"

    def _cut_log(self) -> None:
        """Drop log lines written after the checkpoint we resume from."""
        if not self.writes or not self.log_path.is_file():
            return
        keep = [ln for ln in self.log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step_count]
        atomic_write(self.log_path, ("\n".join(keep) + "\n" if keep else "").encode())

    def check_finite(self, losses: list[Any]) -> None:
        """Stop with the last good checkpoint kept if any run's loss is NaN or inf."""
        for run, loss in zip(self.runs, losses):
            if not math.isfinite(float(loss.total)):
                raise TrainingDiverged(
                    f"run {run.name} diverged at step {self.step_count} (loss {float(loss.total)}); "
                    f"the last good checkpoint (step {self.last_good}) is kept in {self.checkpoint_path}: "
                    f"lower the learning rate (--lr, now {run.lr:g}) or the coefficient (now {run.coefficient:g})"
                )

    def log(self, losses: list[Any], batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.check_finite(losses)
        lines, first = [], {}
        for run, loss in zip(self.runs, losses):
            x = batch[run.site].float()
            mse = float(loss.mse)
            var = float((x - x.mean(0)).pow(2).sum(-1).mean())
            rec = {
                "step": self.step_count,
                "run": run.name,
                "loss": float(loss.total),
                "mse": mse,
                "sparsity": float(loss.sparsity),
                "aux": float(loss.aux),
                "l0": float((loss.codes != 0).sum(-1).float().mean()),
                "fvu": mse / var,
                "lr": run.lr * self.lr_factor(self.step_count - 1),
                "coefficient": run.coefficient * self.coef_factor(self.step_count - 1),
                "dead_fraction": float((run.last_fired <= self.step_count - self.dead_window).float().mean()),
            }
            lines.append(json.dumps(rec))
            first = first or rec
        if self.writes:
            with open(self.log_path, "a") as f:
                f.write("\n".join(lines) + "\n")
        return first

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> dict[str, Dictionary]:
        """Train (or resume) every run to the end, save each SAE and return them by name.

        Data-parallel, only rank 0 saves and returns the dictionaries; the other ranks return ``{}``.
        """
        if self.writes:
            self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.load_checkpoint()
        self._cut_log()
        stop = self.total_steps if self.cfg.stop_after is None else min(self.total_steps, self.cfg.stop_after)
        batches = self.store.batches(
            self.sites,
            self.cfg.batch_size,
            epochs=self.cfg.epochs,
            seed=self.cfg.seed,
            device=self.device,
            drop_last=True,
            skip=self.step_count,
            part=self.part,
            reuse=True,  # each batch is used up (scaled into a new tensor) before the next is asked for
        )
        desc = f"train {len(self.runs)} SAE{'s' * (len(self.runs) > 1)}" + (" (resumed)" if resumed else "")
        bar = tqdm(
            total=self.total_steps * self.cfg.batch_size,
            initial=self.step_count * self.cfg.batch_size,
            unit="act",
            unit_scale=True,
            desc=desc,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        t0, start_step = time.perf_counter(), self.step_count
        with bar, contextlib.closing(batches):  # closing ends the read-ahead thread when training stops early
            for parts in batches:
                if self.step_count >= stop:
                    break
                batch = {s: p * self.scales[s] for s, p in zip(self.sites, parts)}
                losses = self.step(batch)
                _injected_fault(self.world.rank, self.step_count)
                bar.update(self.cfg.batch_size)
                if self.step_count % self.cfg.log_every == 0 or self.step_count == self.total_steps:
                    rec = self.log(losses, batch)
                    bar.set_postfix(loss=f"{rec['loss']:.3g}", l0=f"{rec['l0']:.1f}", fvu=f"{rec['fvu']:.3f}")
                if self.step_count % self.cfg.checkpoint_every == 0 or self.step_count == stop:
                    self.check_finite(losses)
                    self.save_checkpoint()
        seconds = time.perf_counter() - t0
        if self.step_count < self.total_steps:
            return {}
        if self.data_parallel:
            params = [p for run in self.runs for p in run.sae.parameters()]
            if not distributed.same_on_every_rank(params, "the final check"):
                raise CircuitSAEError("the ranks' parameters differ after training: a bug; please report it")
            if not self.world.main:
                return {}
        return self.finish(seconds, self.step_count - start_step)

    def finish(self, seconds: float, steps_this_session: int) -> dict[str, Dictionary]:
        """Fold the input scale, evaluate on held-out rows, save every SAE; write ``train.json``."""
        heldout = {
            s: self.store.activations(s, "heldout", max_rows=self.cfg.eval_rows)
            if self.store.n_rows("heldout")
            else None
            for s in self.sites
        }
        saved, summary = {}, {"config": asdict(self.cfg), "steps": self.total_steps, "runs": {}}
        for run in self.runs:
            sae = run.sae.float().eval()  # on the training device: the held-out metrics are computed there
            sae.fold_input_scale(self.scales[run.site])
            metrics = reconstruction(sae, heldout[run.site]) if heldout[run.site] is not None else {}
            metrics.pop("density_histogram", None)
            sae.meta.update(
                model=self.store.config["model"],
                site=run.site,
                first_position=int(self.store.meta["first_position"]),
                input_scale=self.scales[run.site],
                store=str(self.store.root),
                training={
                    "coefficient": run.coefficient,
                    "lr": run.lr,
                    "betas": list(registry.get_trainable(run.arch).training.betas),
                    "batch_size": self.cfg.batch_size,
                    "steps": self.total_steps,
                    "activations": self.total_steps * self.cfg.batch_size,
                    "lr_warmup_steps": self.lr_warmup_steps,
                    "coef_warmup_steps": self.coef_warmup_steps,
                    "resample_every": self.resample_every,
                    "seed": self.cfg.seed,
                },
                metrics=metrics,
            )
            sae.save(self.out / run.name)
            saved[run.name] = sae
            summary["runs"][run.name] = {
                "site": run.site,
                "arch": run.arch,
                "coefficient": run.coefficient,
                "resampled_features_last_session": self.resampled.get(run.name, 0),
                **metrics,
            }
        summary["seconds_last_session"] = seconds
        summary["activations_per_second"] = steps_this_session * self.cfg.batch_size / max(seconds, 1e-9)
        summary["world_size"] = self.world.size
        if self.data_parallel:
            summary["allreduce_bytes_per_step"] = self.allreduce_bytes
        name = f"train{self._rank_suffix}.json"
        atomic_write(self.out / name, json.dumps(summary, indent=1, default=str).encode())
        return saved


def _injected_fault(rank: int, step: int) -> None:
    """``CIRCUITSAE_KILL_AT=RANK:STEP`` kills this process with SIGKILL after that step (tests of crash and resume)."""
    spec = os.environ.get("CIRCUITSAE_KILL_AT")
    if spec and spec == f"{rank}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


@torch.no_grad()
def _remove_parallel_grad(sae: Dictionary) -> None:
    """g ← g − (g·f) f for every unit-norm row f of the constrained weights."""
    for w in sae.constrained():
        if w.grad is not None:
            w.grad.sub_((w.grad * w).sum(-1, keepdim=True) * w)


@torch.no_grad()
def _renormalise(sae: Dictionary) -> None:
    for w in sae.constrained():
        w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-8))


def train(config: "TrainConfig | None" = None, *, progress: bool = True, **overrides: Any) -> dict[str, Dictionary]:
    """Train every run of ``config`` in one pass over the store; return the saved dictionaries by run name.

    ``train(store="runs/acts", arch=["relu", "gated"], coefficients=[1, 4])``
    trains four SAEs per site, each saved under ``out/<site>-<arch>-c<coef>/``.
    Re-running the same call resumes from ``out/checkpoint.pt``; with
    ``stop_after`` set it stops early (checkpointed) and returns ``{}``.
    """
    cfg = TrainConfig(**{**(asdict(config) if config else {}), **overrides})
    return Trainer(cfg, progress=progress).fit()
