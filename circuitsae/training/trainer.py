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

Dead-feature resampling: :mod:`~circuitsae.training.resampling`; checkpoints, resume and the log:
:mod:`~circuitsae.training.checkpoints`; the warm-up and resampling schedule: :mod:`~circuitsae.training.schedule`;
which runs train and how each is built: :mod:`~circuitsae.training.runs`; the config:
:mod:`~circuitsae.training.config`.

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
import itertools
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from circuitsae import distributed
from circuitsae.data.store import ActivationStore
from circuitsae.data.stream import ModelStream
from circuitsae.dictionaries import Dictionary, registry
from circuitsae.errors import CircuitSAEError
from circuitsae.io import lock_folder, probe_folder
from circuitsae.memory import format_bytes
from circuitsae.memory import limit as memory_limit
from circuitsae.models import load_model, model_name, resolve_device
from circuitsae.training import schedule
from circuitsae.training.checkpoints import Checkpoints, TrainingDiverged
from circuitsae.training.config import PARALLEL_MODES, TrainConfig
from circuitsae.training.evaluate import reconstruction
from circuitsae.training.resampling import resample_dead
from circuitsae.training.runs import (
    SCALE_ROWS,
    Run,
    Source,
    input_scale,
    input_scales,
    make_run,
    memory_plan,
    plan_runs,
    run_name,
)
from circuitsae.training.schedule import AUX_DEAD_TOKENS, MIN_RESAMPLE_WINDOW

__all__ = [
    "AUX_DEAD_TOKENS",
    "MIN_RESAMPLE_WINDOW",
    "PARALLEL_MODES",
    "SCALE_ROWS",
    "Checkpoints",
    "Run",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "input_scale",
    "input_scales",
    "make_run",
    "plan_runs",
    "resample_dead",
    "run_name",
    "train",
]

# Which architectures train, their lr, Adam betas, default coefficient, whether it is k, and whether dead features
# are resampled: each class declares them (``training``, ``resamples_dead``, ``for_training``) and the trainer
# asks :mod:`circuitsae.dictionaries.registry`. relu/gated defaults give L0 ≈ 75 and ≈ 55 at SmolLM2 resid.6
# (pareto.json); topk/batchtopk: k; jumprelu: λ of the L0 penalty.


class Trainer:
    """Owns the runs, the schedule and the checkpoint; :meth:`fit` is a short loop over :meth:`step`."""

    def __init__(self, cfg: TrainConfig, progress: bool = True, model: Any = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.world = distributed.init(self.device.type)
        if self.world.active and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.world.local_rank)
        self.data_parallel = self.world.active and cfg.parallel == "data"
        self.progress = progress and self.world.main
        if self.data_parallel and cfg.batch_size % self.world.size:
            raise CircuitSAEError(
                f"--batch-size {cfg.batch_size} is not divisible by the {self.world.size} ranks: each rank takes an "
                f"equal share of every batch (use a multiple of {self.world.size})"
            )
        self.out = Path(cfg.out)
        fingerprint = cfg.fingerprint()
        if cfg.streams and self.data_parallel:  # each rank streams its own range of the tokens: another training
            fingerprint += f"-world{self.world.size}"
        self.part = (self.world.rank, self.world.size) if self.data_parallel else (0, 1)
        self.source = distributed.on_every_rank(
            lambda: self._open_source(model), "loading the model" if cfg.streams else "opening the store"
        )  # first: a source that cannot be read leaves no output folder behind
        self.checkpoints = Checkpoints(self.out, fingerprint, self.world, self.data_parallel)
        distributed.on_every_rank(self._check_out, "checking the output folder")  # before any work
        if self.source.n_rows("train") == 0:
            raise CircuitSAEError(f"{self.source.describe()} has no training activations")
        self.plan = plan_runs(cfg, self.source)
        self.sites = sorted({s for s, _, _ in self.plan}, key=self.source.sites.index)
        self.total_steps = self.source.n_batches(cfg.batch_size, epochs=cfg.epochs, drop_last=True)
        if self.total_steps < 1:
            raise CircuitSAEError(
                f"{self.source.describe()}: {self.source.n_rows('train')} training rows, fewer than one batch "
                f"of {cfg.batch_size}: "
                + ("train on more --tokens" if cfg.streams else "harvest more tokens")
                + " or lower --batch-size"
            )
        self.lr_warmup_steps = schedule.warmup_steps(cfg.lr_warmup, self.total_steps)
        self.coef_warmup_steps = schedule.warmup_steps(cfg.coef_warmup, self.total_steps)
        self.dead_window = schedule.dead_window(cfg.resample_every, self.total_steps)
        self.resample_every = schedule.resample_period(cfg.resample_every, self.dead_window)
        self.aux_dead_steps = schedule.aux_dead_steps(cfg.batch_size, self.total_steps)
        self.autocast = self.device.type == "cuda" if cfg.autocast is None else bool(cfg.autocast)
        self.heldout_rows = min(cfg.eval_rows, self.source.n_rows("heldout"))
        itemsize = self.source.storage_dtype.itemsize
        self.memory = memory_plan(cfg, self.source.d, self.plan, len(self.sites), self.heldout_rows, itemsize)
        self.memory.check(self.device, cfg.memory_limit)
        if self.progress:
            cap, where = memory_limit(self.device, cfg.memory_limit)
            loaded = f"; the model, {format_bytes(model_bytes(self.model))}, is loaded" if cfg.streams else ""
            print(
                f"memory plan: {self.memory.describe()} (limit {format_bytes(cap)}, {where}{loaded})", file=sys.stderr
            )
        torch.manual_seed(cfg.seed)
        self._scales: "dict[str, float] | None" = None  # estimated when first needed, unless a checkpoint holds them
        self.runs = [make_run(cfg, self.source.d, s, a, c, self.device, i) for i, (s, a, c) in enumerate(self.plan)]
        if self.world.active and cfg.parallel == "runs":  # every rank made every run (same RNG), keeps its own
            if len(self.runs) < self.world.size:
                raise CircuitSAEError(
                    f"--parallel runs splits {len(self.runs)} runs across {self.world.size} ranks: "
                    f"use at most {len(self.runs)} processes"
                )
            self.runs = self.runs[self.world.rank :: self.world.size]
            self.sites = [s for s in self.sites if any(run.site == s for run in self.runs)]
        self.allreduce_bytes = 0  # per step, data-parallel
        self.resampled: dict[str, int] = {}  # features resampled per run (this session)
        self.step_count = 0

    def _open_source(self, model: Any) -> Source:
        """The store, or (``--model``) the model loaded on the training device and a stream of its activations."""
        cfg = self.cfg
        if not cfg.streams:
            self.model = None
            return ActivationStore(cfg.store)
        self.model = model if model is not None else load_model(cfg.model, device=self.device, dtype=cfg.model_dtype)
        return ModelStream(
            self.model,
            cfg.sites,
            tokens=cfg.tokens,
            corpus=cfg.corpus,
            ctx_len=cfg.ctx_len,
            seed=cfg.seed,
            heldout_fraction=cfg.heldout_fraction,
            heldout_rows=cfg.eval_rows,
            keep_bos=cfg.keep_bos,
            chunk_contexts=cfg.chunk_contexts,
            batch_contexts=cfg.model_batch,
            dtype=cfg.buffer_dtype,
            ranks=self.part,
            progress=self.progress,
        )

    @property
    def scales(self) -> dict[str, float]:
        """Each site's input scale: estimated on the first ``scale_sample`` training rows when first needed (from
        a model, those rows cost forward passes), or the checkpoint's."""
        if self._scales is None:
            self._scales = input_scales(self.source, self.sites, self.cfg.scale_sample)
        return self._scales

    @scales.setter
    def scales(self, value: dict[str, float]) -> None:
        self._scales = value

    def _provenance(self, folder: Path) -> dict[str, Any]:
        """What a saved dictionary records about its data: the model, the first position kept, and the store (a
        path relative to the dictionary's own ``folder``, so it resolves from any working directory, and its
        fingerprint) or the stream's settings."""
        if isinstance(self.source, ActivationStore):
            return {
                "model": self.source.config["model"],
                "first_position": int(self.source.meta["first_position"]),
                "store": os.path.relpath(self.source.root.absolute(), folder.absolute()),
                "store_fingerprint": self.source.fingerprint,
            }
        return {
            "model": self.source.model_name,
            "first_position": self.source.first_position,
            "stream": dict(self.source.settings),
        }

    def _check_out(self) -> None:
        """The output folder can be written, no other process writes it, and it holds no other training."""
        if self.world.main:
            with lock_folder(self.out, "training"):
                probe_folder(self.out)
                self.checkpoints.check_config(self.cfg)
        elif self.checkpoints.writes:
            probe_folder(self.out)

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
                g["lr"] = run.lr * schedule.warmup_factor(k, self.lr_warmup_steps) * g.get("lr_scale", 1.0)
            run.sae.set_dead(run.last_fired <= k - self.aux_dead_steps)  # the same on every rank
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = run.sae.loss(x, run.coefficient * schedule.warmup_factor(k, self.coef_warmup_steps))
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
        if schedule.resamples_at(self.step_count, self.resample_every, self.total_steps):
            self._resample(losses, batch)
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

    def _resample(self, losses: list[Any], batch: dict[str, torch.Tensor]) -> None:
        """Resample the dead features of every run that resamples (TopK and BatchTopK have their auxiliary loss)."""
        for run, loss in zip(self.runs, losses):
            if not run.sae.resamples_dead:
                continue
            n = resample_dead(
                run, batch[run.site], loss, self.step_count, self.dead_window, self.world, self.data_parallel
            )
            self.resampled[run.name] = self.resampled.get(run.name, 0) + n

    # -- checkpoint and log ---------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write every run's state atomically; refuses (TrainingDiverged) if a weight is not finite."""
        self.checkpoints.save(self.step_count, self.scales, self.cfg.parallel, self.runs)

    def load_checkpoint(self) -> bool:
        """Resume every run, the step and the input scales from the checkpoint, if there is one."""
        state = self.checkpoints.load(self.runs)
        if state is None:
            return False
        self.step_count, self.scales = state
        return True

    def log(self, losses: list[Any], batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """Append one JSONL line per run (after the divergence check); return the records."""
        self.checkpoints.check_finite(self.runs, losses, self.step_count)
        records = [self._record(run, loss, batch[run.site]) for run, loss in zip(self.runs, losses)]
        self.checkpoints.append_log(records)
        return records

    def postfix(self, records: list[dict[str, Any]]) -> dict[str, str]:
        """What the progress bar shows: one run's loss, L0 and FVU, or with runs at several kinds of site the mean
        FVU and L0 per kind (``resid``, ``attn``, ``mlp``)."""
        groups: dict[str, list[dict[str, Any]]] = {}
        for run, rec in zip(self.runs, records):
            groups.setdefault(run.site.split(".")[0], []).append(rec)
        if len(records) == 1:
            rec = records[0]
            return {"loss": f"{rec['loss']:.3g}", "l0": f"{rec['l0']:.1f}", "fvu": f"{rec['fvu']:.3f}"}
        return {
            kind: "fvu {:.3f} l0 {:.1f}".format(
                sum(r["fvu"] for r in recs) / len(recs), sum(r["l0"] for r in recs) / len(recs)
            )
            for kind, recs in groups.items()
        }

    def _record(self, run: Run, loss: Any, x: torch.Tensor) -> dict[str, float]:
        x = x.float()
        mse = float(loss.mse)
        var = float((x - x.mean(0)).pow(2).sum(-1).mean())
        return {
            "step": self.step_count,
            "run": run.name,
            "loss": float(loss.total),
            "mse": mse,
            "sparsity": float(loss.sparsity),
            "aux": float(loss.aux),
            "l0": float((loss.codes != 0).sum(-1).float().mean()),
            "fvu": mse / var,
            "lr": run.lr * schedule.warmup_factor(self.step_count - 1, self.lr_warmup_steps),
            "coefficient": run.coefficient * schedule.warmup_factor(self.step_count - 1, self.coef_warmup_steps),
            "dead_fraction": float((run.last_fired <= self.step_count - self.dead_window).float().mean()),
        }

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> dict[str, Dictionary]:
        """Train (or resume) every run to the end, save each SAE and return them by name.

        Rank 0 holds the output folder's lock throughout (a second writer is refused in one line) and, before
        any step, refuses a folder that holds another training and records this one's configuration.
        Data-parallel, only rank 0 saves and returns the dictionaries; the other ranks return ``{}``.
        """
        with contextlib.ExitStack() as held:

            def claim() -> None:
                if self.world.main:
                    held.enter_context(lock_folder(self.out, "training"))
                    self.checkpoints.claim(self.cfg)

            distributed.on_every_rank(claim, "taking the output folder")
            return self._train()

    def _train(self) -> dict[str, Dictionary]:
        """:meth:`fit`'s loop, in the claimed folder."""
        if self.checkpoints.writes:
            self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.load_checkpoint()
        self.checkpoints.cut_log(self.step_count)
        stop = self.total_steps if self.cfg.stop_after is None else min(self.total_steps, self.cfg.stop_after)
        batches, bar = self._batches(), self._progress_bar(resumed)
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
                    bar.set_postfix(self.postfix(self.log(losses, batch)))
                if self.step_count % self.cfg.checkpoint_every == 0 or self.step_count == stop:
                    self.checkpoints.check_finite(self.runs, losses, self.step_count)
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

    def _batches(self) -> Any:
        """This rank's part of every remaining global batch (the ones already trained on are skipped)."""
        return self.source.batches(
            self.sites,
            self.cfg.batch_size,
            epochs=self.cfg.epochs,
            seed=self.cfg.seed,
            device=self.device,
            drop_last=True,
            skip=self.step_count,
            part=self.part,
            buffer_rows=self.cfg.buffer,
            reuse=True,  # each batch is used up (scaled into a new tensor) before the next is asked for
        )

    def _progress_bar(self, resumed: bool) -> Any:
        desc = f"train {len(self.runs)} SAE{'s' * (len(self.runs) > 1)}" + (" (resumed)" if resumed else "")
        return tqdm(
            total=self.total_steps * self.cfg.batch_size,
            initial=self.step_count * self.cfg.batch_size,
            unit="tok" if self.cfg.streams else "act",
            unit_scale=True,
            desc=desc,
            disable=not self.progress,
            dynamic_ncols=True,
        )

    def finish(self, seconds: float, steps_this_session: int) -> dict[str, Dictionary]:
        """Fold the input scale, evaluate on held-out rows, save every SAE; write ``train.json``."""
        heldout = self.source.sample(self.sites, "heldout", self.heldout_rows) if self.heldout_rows else {}
        saved, summary = {}, {"config": asdict(self.cfg), "steps": self.total_steps, "runs": {}}
        for run in self.runs:
            sae = run.sae.float().eval()  # on the training device: the held-out metrics are computed there
            sae.fold_input_scale(self.scales[run.site])
            x = heldout.get(run.site)
            metrics = reconstruction(sae, x.to(torch.float32)) if x is not None else {}
            metrics.pop("density_histogram", None)
            sae.meta.update(
                site=run.site,
                input_scale=self.scales[run.site],
                **self._provenance(self.out / run.name),
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
        self.checkpoints.write_summary(summary)
        return saved


def model_bytes(model: Any) -> int:
    """Bytes of a loaded model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


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


def train(
    config: "TrainConfig | None" = None, *, progress: bool = True, model: Any = None, **overrides: Any
) -> dict[str, Dictionary]:
    """Train every run of ``config`` in one pass over the store (or, with ``model=`` set in the config, over the
    model's forward passes); return the saved dictionaries by run name.

    ``model`` is the model to train from: a name (the ``model`` field) or an already loaded model (from
    :func:`circuitsae.load_model`; its name is recorded), as for :func:`circuitsae.data.harvest.harvest`.

    ``train(store="runs/acts", arch=["relu", "gated"], coefficients=[1, 4])``
    trains four SAEs per site, each saved under ``out/<site>-<arch>-c<coef>/``.
    Re-running the same call resumes from ``out/checkpoint.pt``; with
    ``stop_after`` set it stops early (checkpointed) and returns ``{}``.
    """
    loaded = None
    if isinstance(model, str):
        overrides["model"] = model
    elif model is not None:
        loaded, overrides["model"] = model, model_name(model)
    cfg = TrainConfig(**{**(asdict(config) if config else {}), **overrides})
    return Trainer(cfg, progress=progress, model=loaded).fit()
