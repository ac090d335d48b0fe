"""sparsify side of benchmarks/interop.py: write a sparsify TopK SAE folder with sparsify.

Run with benchmarks/.venv-sparsify/bin/python (see setup.sh); benchmarks/interop.py calls it. Prints one
JSON line to stdout; everything the library prints goes to stderr.

``export``: the library's ``SparseCoder(d_in, SparseCoderConfig(num_latents=..., k=...))`` (TopK, the one
activation circuitsae reads; decoder held at unit norm, sparsify's default), ``--steps`` steps of Adam on
its own ``forward(x).fvu`` with the steps its ``Trainer`` wraps around each update (``b_dec`` = the batch
mean at step 0, ``set_decoder_norm_to_unit_norm`` before and
``remove_gradient_parallel_to_decoder_directions`` after the backward). sparsify's ``Trainer`` itself runs
the language model over a tokenised dataset, which this benchmark does not do. Then ``b_dec`` is set to
the mean of the fit rows plus 0.1·their std·N(0,1) and ``encoder.bias`` to 0.2·(each pre-activation's
std)·N(0,1) (seeded), and the coder is saved the way ``Trainer._checkpoint`` saves it:
``SparseCoder.save_to_disk(<run>/layers.6)`` and the run's ``config.json`` (``RunConfig.save_json``, with
the model name and ``ctx_len``). ``SparseCoder.load_from_disk`` reads it back, and its ``encode(x)``
(``top_acts`` scattered at ``top_indices`` into ``[N, num_latents]``) and ``decode(top_acts,
top_indices)`` on the ``--acts`` rows go to ``codes.npy``/``recon.npy`` (and, with the coder in float64,
to ``codes_f64.npy``/``recon_f64.npy``: the reference for the float32 rounding of both sides).

There is no ``load`` direction: circuitsae does not write sparsify folders (``save`` writes circuitsae's
own format or SAE Lens's), and sparsify reads only its own.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interop_common import export_parser, rows, run  # noqa: E402


@torch.no_grad()
def encode_decode(sae, x: torch.Tensor, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    codes, recon = [], []
    for s in range(0, x.shape[0], chunk):
        top_acts, top_indices, _ = sae.encode(x[s : s + chunk])
        dense = torch.zeros(top_acts.shape[0], sae.num_latents, dtype=top_acts.dtype).scatter_(
            -1, top_indices, top_acts
        )
        codes.append(dense)
        recon.append(sae.decode(top_acts, top_indices))
    return torch.cat(codes).numpy(), torch.cat(recon).numpy()


def export(args: argparse.Namespace) -> dict:
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.__main__ import RunConfig

    x, fit = rows(args.acts), rows(args.fit)
    d = x.shape[1]
    m = args.d_sae or 4 * d
    torch.manual_seed(args.seed)
    cfg = SparseCoderConfig(num_latents=m, k=args.k)
    sae = SparseCoder(d, cfg, device="cpu", dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    print(f"[interop_sparsify] SparseCoder TopK k={args.k}: {args.steps} steps", file=sys.stderr, flush=True)
    for step in range(args.steps):
        batch = fit[torch.arange(step * args.batch, (step + 1) * args.batch) % fit.shape[0]]
        if step == 0:
            sae.b_dec.data = batch.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(batch)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
    sae.set_decoder_norm_to_unit_norm()
    g = torch.Generator().manual_seed(args.seed + 100)
    with torch.no_grad():
        sae.b_dec.copy_(fit.mean(0) + 0.1 * fit.std(0) * torch.randn(d, generator=g))
        pre = (fit - sae.b_dec) @ sae.encoder.weight.T
        sae.encoder.bias.copy_(0.2 * pre.std(0) * torch.randn(m, generator=g))
    run = Path(args.out) / "topk" / "sae"
    sae.save_to_disk(run / args.hookpoint)
    RunConfig(sae=cfg, model=args.model, ctx_len=args.context_size, hookpoints=[args.hookpoint]).save_json(
        str(run / "config.json")
    )
    loaded = SparseCoder.load_from_disk(run / args.hookpoint)
    codes, recon = encode_decode(loaded, x)
    folder = run.parent
    np.save(folder / "codes.npy", codes)
    np.save(folder / "recon.npy", recon)
    c64, r64 = encode_decode(SparseCoder.load_from_disk(run / args.hookpoint).double(), x.double())
    np.save(folder / "codes_f64.npy", c64)
    np.save(folder / "recon_f64.npy", r64)
    norms = loaded.W_dec.detach().norm(dim=-1)
    np.save(folder / "decoder_norms.npy", norms.float().numpy())
    case = {
        "architecture": "topk",
        "class": type(loaded).__name__,
        "k": args.k,
        "hookpoint": args.hookpoint,
        "folder": f"sae/{args.hookpoint}",
        "decoder_norms": [float(norms.min()), float(norms.max())],
    }
    return {
        "peer": "sparsify",
        "version": importlib.metadata.version("eai-sparsify"),
        "torch": torch.__version__,
        "d": d,
        "d_sae": m,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "cases": [case],
    }


def main() -> None:
    p, _, e = export_parser(__doc__.splitlines()[0], "sparsify saves, sparsify encodes", steps=40, lr=1e-3)
    e.add_argument("--hookpoint", default="layers.6")
    e.add_argument("--context-size", type=int, default=128)
    run(p, export)


if __name__ == "__main__":
    main()
