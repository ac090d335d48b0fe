"""The files of one training folder: its configuration, the checkpoint, the JSONL log and ``train.json``.

**One training per folder.** At its start a training records its configuration (``train-config.json``: the
fingerprint and every setting) and refuses a folder that holds another one, before any step, naming the settings
that differ (a folder written before this record existed is compared with its ``train.json``, and its checkpoint
by fingerprint).

**Checkpoints and resume.** Every ``checkpoint_every`` steps all runs' weights, optimiser moments, dead-feature
counters and RNG state are written atomically to ``out/checkpoint.pt``. Re-running the same command resumes
exactly: the batch stream skips the batches already seen and the JSONL log is cut back to the checkpoint, so the
result equals an uninterrupted run. A non-finite loss stops training with the last good checkpoint kept.
Checkpoints are read onto the CPU and each piece goes where it lives (weights and moments to the training device,
the sampling generator stays on the CPU), so a run saved on one device resumes on another.

**Ranks.** Data-parallel, only rank 0 writes, and every rank resumes from its checkpoint. Run-parallel, each rank
keeps its own checkpoint, log and ``train.json`` (suffix ``-rank{r}of{N}``), and resuming needs the same N.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from circuitsae import distributed
from circuitsae.errors import CircuitSAEError
from circuitsae.io import append_bytes, atomic_write
from circuitsae.training.runs import Run

#: the configuration a training folder holds (written at the start of the training)
CONFIG_NAME = "train-config.json"


class TrainingDiverged(CircuitSAEError):
    """A run's loss became NaN or inf; the last good checkpoint is kept."""


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(_shown, value)) if value else "()"
    if isinstance(value, float):
        return f"{value:g}"
    return "default" if value is None else str(value)


def differing_settings(cfg: Any, recorded: dict[str, Any]) -> list[str]:
    """The settings of ``cfg`` (a TrainConfig) whose ``recorded`` values would make another training (another
    fingerprint); settings that do not (the output folder, the device, logging) are left out."""
    now = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    mine = cfg.fingerprint()
    names = []
    for name, value in recorded.items():
        if name not in now or now[name] == value:
            continue
        try:
            other = dataclasses.replace(cfg, **{name: value}).fingerprint() != mine
        except (CircuitSAEError, TypeError, ValueError):  # a value this version refuses: another training
            other = True
        if other:
            names.append(name)
    return names


class Checkpoints:
    """Paths (with rank suffixes), save/load of every run's state, the log and its truncation, ``train.json``."""

    def __init__(self, out: Path, fingerprint: str, world: distributed.World, data_parallel: bool) -> None:
        self.out = out
        self.fingerprint = fingerprint  # what must match for a checkpoint to be resumed
        self.world = world
        self.data_parallel = data_parallel
        self.last_good = 0  # step of the last checkpoint written or resumed from

    @property
    def rank_suffix(self) -> str:
        """Run-parallel ranks keep files of their own; data-parallel ranks share rank 0's."""
        if self.world.active and not self.data_parallel:
            return f"-rank{self.world.rank}of{self.world.size}"
        return ""

    @property
    def writes(self) -> bool:
        """Whether this process writes checkpoints, logs and saved dictionaries (data-parallel: rank 0 only)."""
        return self.world.main or not self.data_parallel

    @property
    def path(self) -> Path:
        return self.out / f"checkpoint{self.rank_suffix}.pt"

    @property
    def log_path(self) -> Path:
        return self.out / f"log{self.rank_suffix}.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.out / f"train{self.rank_suffix}.json"

    @property
    def config_path(self) -> Path:
        return self.out / CONFIG_NAME

    def _recorded(self) -> "tuple[dict[str, Any], str | None] | None":
        """The configuration the folder holds and its fingerprint (None: from an older ``train.json``), if any."""
        for path, key in ((self.config_path, "config"), (self.summary_path, "config")):
            if not path.is_file():
                continue
            try:
                held = json.loads(path.read_text())
                config = held[key]
            except (OSError, ValueError, KeyError, TypeError):
                raise CircuitSAEError(
                    f"{path} is unreadable: delete the folder {self.out} to start over, or use another --out"
                ) from None
            if isinstance(config, dict):
                return config, held.get("fingerprint") if path == self.config_path else None
        return None

    def check_config(self, cfg: Any) -> None:
        """Refuse, in one line naming the settings that differ, a folder that holds another training than
        ``cfg``'s (with or without a checkpoint there)."""
        recorded = self._recorded()
        if recorded is None:
            return
        config, fingerprint = recorded
        names = differing_settings(cfg, config)
        if not names and fingerprint in (None, self.fingerprint):
            return
        now = dataclasses.asdict(cfg)
        there = ", ".join(f"{n}={_shown(config[n])}" for n in names) or f"fingerprint {fingerprint}"
        here = ", ".join(f"{n}={_shown(now[n])}" for n in names) or f"fingerprint {self.fingerprint}"
        raise CircuitSAEError(
            f"{self.out} holds a different training command, with {there} (this one: {here}): use another --out, "
            "or delete the folder to start over"
        )

    def claim(self, cfg: Any) -> None:
        """At the start of a training: :meth:`check_config`, then record ``cfg`` in the folder (rank 0)."""
        self.check_config(cfg)
        if self.world.main and not self.config_path.is_file():
            record = {"fingerprint": self.fingerprint, "config": dataclasses.asdict(cfg)}
            atomic_write(self.config_path, json.dumps(record, indent=1, default=str).encode())

    def save(self, step: int, scales: dict[str, float], parallel: str, runs: list[Run]) -> None:
        """Write every run's state atomically; refuses (TrainingDiverged) if a weight is not finite."""
        for run in runs:
            if not all(bool(torch.isfinite(p).all()) for p in run.sae.parameters()):
                raise TrainingDiverged(
                    f"run {run.name} has non-finite weights at step {step}; the last good checkpoint "
                    f"(step {self.last_good}) is kept in {self.path}: lower the learning rate "
                    f"(--lr, now {run.lr:g}) or the coefficient (now {run.coefficient:g})"
                )
        self.last_good = step
        if not self.writes:
            return
        state = {
            "fingerprint": self.fingerprint,
            "step": step,
            "scales": scales,
            "world_size": self.world.size,
            "parallel": parallel if self.world.active else None,
            "runs": [
                {
                    "name": r.name,
                    "sae": r.sae.state_dict(),
                    "optimizer": r.optimizer.state_dict(),
                    "last_fired": r.last_fired,
                    "generator": r.generator.get_state(),
                }
                for r in runs
            ],
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(self.path, buf.getvalue())

    def load(self, runs: list[Run]) -> tuple[int, dict[str, float]] | None:
        """Restore every run from the checkpoint; return its (step, input scales), or None if there is none."""
        if self.out.is_dir():  # run-parallel checkpoints of another world size: their runs would start over
            mine = f"of{self.world.size}.pt" if self.rank_suffix else None
            others = sorted(
                p.name for p in self.out.glob("checkpoint-rank*of*.pt") if not (mine and p.name.endswith(mine))
            )
            if others:
                raise CircuitSAEError(
                    f"{self.out} holds run-parallel checkpoints of another number of ranks ({others[0]}): the runs "
                    "are split by rank, so resume with that many processes, or use another --out"
                )
        if not self.path.is_file():
            return None
        # on the CPU first: the generator's state must stay there, and each tensor is then copied where it lives
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            raise CircuitSAEError(
                f"{self.path} belongs to a different training command; use another --out "
                f"or delete the checkpoint to start over"
            )
        if any("generator" not in saved for saved in state["runs"]):
            raise CircuitSAEError(
                f"{self.path} was written by an older circuitsae (one resampling generator for all "
                "runs): delete it to start over, or finish that training with the version that wrote it"
            )
        written_by = int(state.get("world_size", 1))
        if written_by != self.world.size and self.world.main:
            print(
                f"note: resuming a checkpoint written by {written_by} process(es) with {self.world.size}: the same "
                "global batches, so the same training up to floating-point rounding",
                file=sys.stderr,
            )
        self.last_good = int(state["step"])
        for run, saved in zip(runs, state["runs"]):
            run.sae.load_state_dict(saved["sae"])
            run.optimizer.load_state_dict(saved["optimizer"])
            run.last_fired.copy_(saved["last_fired"])
            run.generator.set_state(saved["generator"])
        return int(state["step"]), state["scales"]

    def cut_log(self, step: int) -> None:
        """Drop log lines written after ``step``, the checkpoint we resume from."""
        if not self.writes or not self.log_path.is_file():
            return
        keep = []
        for ln in self.log_path.read_text().splitlines():
            try:
                record = json.loads(ln)
            except ValueError:  # a line cut short (by a crash): its step is re-run and logged again
                continue
            if record["step"] <= step:
                keep.append(ln)
        atomic_write(self.log_path, ("\n".join(keep) + "\n" if keep else "").encode())

    def append_log(self, records: list[dict[str, Any]]) -> None:
        """One JSONL line per record (this process writes only if :attr:`writes`), appended whole or not at all."""
        if self.writes:
            append_bytes(self.log_path, ("\n".join(json.dumps(rec) for rec in records) + "\n").encode())

    def check_finite(self, runs: list[Run], losses: list[Any], step: int) -> None:
        """Stop with the last good checkpoint kept if any run's loss is NaN or inf."""
        for run, loss in zip(runs, losses):
            if not math.isfinite(float(loss.total)):
                raise TrainingDiverged(
                    f"run {run.name} diverged at step {step} (loss {float(loss.total)}); "
                    f"the last good checkpoint (step {self.last_good}) is kept in {self.path}: "
                    f"lower the learning rate (--lr, now {run.lr:g}) or the coefficient (now {run.coefficient:g})"
                )

    def write_summary(self, summary: dict[str, Any]) -> None:
        """``train.json``: the config, the steps and every run's held-out metrics."""
        atomic_write(self.summary_path, json.dumps(summary, indent=1, default=str).encode())
