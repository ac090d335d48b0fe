"""What the interop runners share (benchmarks/interop.py and peers/interop_*.py).

The runners run inside the peers' own virtual environments, so this file depends on nothing but numpy, torch
and the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable

import numpy as np
import torch


def emit(record: dict) -> None:
    """The runner's one JSON line on the real stdout (the peer's own prints go to stderr)."""
    sys.__stdout__.write(json.dumps(record) + "\n")
    sys.__stdout__.flush()


def rows(path: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.load(path), dtype=np.float32))


def cycle(fit: torch.Tensor, batch: int):
    """Endless consecutive ``batch``-row slices of ``fit``, wrapping around: the training batches every runner feeds
    its library."""
    pos = 0
    while True:
        yield fit[torch.arange(pos, pos + batch) % fit.shape[0]]
        pos += batch


def quantile_per_feature(pre: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Feature i's q_i-quantile of ``pre[:, i]``: the midpoint of two neighbouring sorted values (never a value)."""
    s = pre.sort(dim=0).values
    i = (q * (s.shape[0] - 2)).long().clamp(0, s.shape[0] - 2)
    cols = torch.arange(s.shape[1])
    return 0.5 * (s[i, cols] + s[i + 1, cols])


@torch.no_grad()
def encode_decode(sae, x: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``sae.encode`` (each class's default: the BatchTopK classes use their threshold) and ``sae.decode`` of
    ``x``, ``chunk`` rows at a time: dense codes and reconstructions."""
    codes, recon = [], []
    for s in range(0, x.shape[0], chunk):
        c = sae.encode(x[s : s + chunk])
        codes.append(c)
        recon.append(sae.decode(c))
    return torch.cat(codes), torch.cat(recon)


def encode_decode_numpy(sae, x: torch.Tensor, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    codes, recon = encode_decode(sae, x, chunk)
    return codes.numpy(), recon.numpy()


def export_parser(description: str, help: str, *, steps: int, lr: "float | None" = None):
    """The runner's parser with its ``export`` subcommand holding the options every runner shares; returns
    (parser, subparsers, export parser) for the runner's own options."""
    p = argparse.ArgumentParser(description=description)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help=help)
    e.add_argument("--acts", required=True, help=".npy float32 [N, d]: the rows compared")
    e.add_argument("--fit", required=True, help=".npy float32 [M, d]: rows for training and the random settings")
    e.add_argument("--out", required=True)
    e.add_argument("--d-sae", type=int, default=None, help="default 4*d")
    e.add_argument("--k", type=int, default=32)
    e.add_argument("--steps", type=int, default=steps)
    e.add_argument("--batch", type=int, default=512)
    if lr is not None:
        e.add_argument("--lr", type=float, default=lr)
    e.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=2)
    return p, sub, e


def run(parser: argparse.ArgumentParser, export: Callable[[argparse.Namespace], dict]) -> None:
    """Parse, set the threads, run ``export`` with the peer's prints on stderr, emit its record."""
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):
        record = export(args)
    emit(record)
