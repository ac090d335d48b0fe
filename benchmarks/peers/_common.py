"""Shared CLI, batching and timing for the peer runners.

Imported by saelens_runner.py and dictlearn_runner.py, which run inside their
own virtual environments (benchmarks/.venv-saelens, benchmarks/.venv-dictlearn);
this file must therefore depend on nothing but numpy, torch and the stdlib.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

BATCH_NOTE = (
    "batches are consecutive slices of the array (wrapping around), copied to "
    "float32 torch tensors on the device OUTSIDE the timed region"
)


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--acts", required=True, help=".npy float32 array [N, d]")
    p.add_argument("--arch", choices=("standard", "gated"), default="standard")
    p.add_argument("--d-sae", type=int, default=None, help="dictionary size (default 8*d)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps run first")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help=".npz of a trained SAE to start from (circuitsae's parameter names, "
                   "W_* as [d_sae, d]); sets --d-sae")  # fmt: skip
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--steps must be >= 1, --warmup >= 0, --batch >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.init_arrays = None
    if args.init:
        with np.load(args.init) as z:
            args.init_arrays = {k: torch.from_numpy(z[k].astype(np.float32)) for k in z.files}
        args.d_sae = int(args.init_arrays["W_dec"].shape[0])
    return args


@torch.no_grad()
def load_into(params: dict, arrays: "dict | None", names: dict, transpose: tuple = ()) -> None:
    """Copy a trained SAE's ``arrays`` into a library's parameters: ``names`` maps the library's names to
    circuitsae's; those in ``transpose`` are stored the other way round there. Every parameter must be covered."""
    if arrays is None:
        return
    missing = sorted(set(params) - set(names))
    if missing:
        raise SystemExit(f"--init: no value for the parameters {missing}")
    for lib_name, ours in names.items():
        src = arrays[ours].T if lib_name in transpose else arrays[ours]
        if tuple(params[lib_name].shape) != tuple(src.shape):
            raise SystemExit(
                f"--init: {lib_name} has shape {tuple(params[lib_name].shape)}, the file {tuple(src.shape)}"
            )
        params[lib_name].copy_(src)


@torch.no_grad()
def l0(codes: torch.Tensor) -> float:
    """Mean number of open units per row."""
    return float((codes > 0).sum(-1).float().mean())


def load_acts(path: str) -> np.ndarray:
    acts = np.load(path, mmap_mode="r")
    if acts.ndim != 2:
        raise SystemExit(f"--acts must be a 2-D array [N, d], got shape {acts.shape}")
    return acts


class Batches:
    """Consecutive [batch, d] slices of `acts`, wrapping around at the end."""

    def __init__(self, acts: np.ndarray, batch: int, device: str):
        self.acts = acts
        self.batch = batch
        self.device = torch.device(device)
        self.pos = 0

    def next(self) -> torch.Tensor:
        n = self.acts.shape[0]
        start, stop = self.pos, self.pos + self.batch
        if stop <= n:
            chunk = self.acts[start:stop]
        else:
            chunk = self.acts.take(np.arange(start, stop) % n, axis=0)
        self.pos = stop % n
        # A real copy: a view would alias the read-only memory map and move page
        # faults (disk reads) into the timed step.
        x = torch.from_numpy(np.array(chunk, dtype=np.float32, copy=True, order="C"))
        return x.to(self.device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(
    args: argparse.Namespace,
    batches: Batches,
    step_fn: Callable[[int, torch.Tensor], object],
) -> list[float]:
    """Run args.warmup untimed then args.steps timed calls of step_fn(step, x).

    `step` is the global step index (warmup steps included), starting at 0.
    Each batch is prepared (and the device synchronised) before the clock
    starts; the clock stops after a synchronise once the step returned.
    Returns the per-step wall times of the timed steps.
    """
    times: list[float] = []
    for step in range(args.warmup + args.steps):
        x = batches.next()
        sync(args.device)
        t0 = time.perf_counter()
        step_fn(step, x)
        sync(args.device)
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
    return times


def emit(
    args: argparse.Namespace,
    *,
    peer: str,
    version: str,
    d: int,
    d_sae: int,
    times: list[float],
    notes: str,
    **extra: object,
) -> None:
    seconds = sum(times)
    record = {
        "peer": peer,
        "version": version,
        "torch": torch.__version__,
        "arch": args.arch,
        "d": d,
        "d_sae": d_sae,
        "batch": args.batch,
        "steps": args.steps,
        "seconds": seconds,
        "acts_per_s": args.batch * args.steps / seconds if seconds > 0 else None,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "notes": notes,
        "warmup": args.warmup,
        "lr": args.lr,
        "step_seconds_median": statistics.median(times),
        "step_seconds_min": min(times),
        **extra,
    }
    # The runners send everything the libraries print to stderr, so that the
    # real stdout carries this one JSON line only.
    sys.__stdout__.write(json.dumps(record) + "\n")
    sys.__stdout__.flush()


def main(description: str, run: Callable[[argparse.Namespace], dict]) -> None:
    """Parse the shared flags, call ``run(args)`` with library prints sent to stderr, emit its record."""
    args = parse_args(description)
    with contextlib.redirect_stdout(sys.stderr):
        record = run(args)
    emit(args, **record)


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
