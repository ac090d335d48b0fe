"""Times circuitsae's own training step (Trainer.step) on the same array and settings as the peers.

Run with the project's own python (.venv). ``--arch standard`` is the ReLU SAE
in the form the peers train (untied encoder, learned b_dec); ``gated`` is the
Gated SAE. ``--runs N`` trains N SAEs of that architecture on each batch in
one step (the multi-SAE pass); throughput is then counted per SAE-activation.
``--autograd`` trains through the plain-autograd losses (``loss_reference``)
instead of the hand-written backward passes, to measure what those gain.
``--dense`` keeps every step on the dense path (``fused.SPARSE_BELOW = 0``), to measure what the sparse one gains.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import circuitsae  # noqa: E402
from circuitsae.data.store import store_from_tensors  # noqa: E402
from circuitsae.dictionaries import GatedSAE, ReluSAE, fused  # noqa: E402
from circuitsae.training.trainer import TrainConfig, Trainer  # noqa: E402


def main() -> None:
    runs = 1
    if "--runs" in sys.argv:
        i = sys.argv.index("--runs")
        runs = int(sys.argv[i + 1])
        del sys.argv[i : i + 2]
    autograd = "--autograd" in sys.argv
    if autograd:
        sys.argv.remove("--autograd")
        ReluSAE.loss, GatedSAE.loss = ReluSAE.loss_reference, GatedSAE.loss_reference
    if "--dense" in sys.argv:
        sys.argv.remove("--dense")
        fused.SPARSE_BELOW = 0.0
    args = _common.parse_args(__doc__.splitlines()[0])
    acts = _common.load_acts(args.acts)
    d = acts.shape[1]
    d_sae = args.d_sae or 8 * d
    with tempfile.TemporaryDirectory() as tmp:
        # A minimal store only so the Trainer can be built; batches come from the same array as the peers.
        store_from_tensors(Path(tmp) / "acts", {"resid.0": torch.from_numpy(np.array(acts[: args.batch]))})
        cfg = TrainConfig(
            store=str(Path(tmp) / "acts"),
            out=str(Path(tmp) / "out"),
            arch=("relu" if args.arch == "standard" else "gated",),
            coefficients=tuple(float(c) for c in np.geomspace(1, 8, runs)) if runs > 1 else (),
            expansion=d_sae / d,
            tied=False,
            decoder_bias=True,
            lr=args.lr,
            batch_size=args.batch,
            resample_every=-1,
            device=args.device,
        )
        trainer = Trainer(cfg, progress=False)
        sae = trainer.runs[0].sae
        names = {n: "W_enc" if n == "W_enc_untied" else n for n, _ in sae.named_parameters()}
        _common.load_into(dict(sae.named_parameters()), args.init_arrays, names)
        trainer.total_steps = 10**9  # schedules as in a long run (warm-up fractions of it)
        trainer.lr_warmup_steps = trainer.coef_warmup_steps = 1
        batches = _common.Batches(acts, args.batch, args.device)
        times = _common.time_steps(args, batches, lambda step, x: trainer.step({"resid.0": x}))
        l0_after = _common.l0(trainer.step({"resid.0": batches.next()})[0].codes)  # one more, untimed
    times = [t / runs for t in times]  # seconds per SAE-step
    _common.emit(
        args,
        peer="circuitsae"
        + (f" ({runs} SAEs per pass)" if runs > 1 else "")
        + (" (plain autograd)" if autograd else "")
        + (" (dense path)" if fused.SPARSE_BELOW == 0.0 else ""),
        version=circuitsae.__version__ if hasattr(circuitsae, "__version__") else "dev",
        d=d,
        d_sae=d_sae,
        times=times,
        notes="timed: circuitsae Trainer.step (forward, loss, backward, parallel-gradient removal, fused Adam, "
        "renormalisation, firing counters); " + _common.BATCH_NOTE,
        runs_per_pass=runs,
        l0_after=l0_after,
        sparse_below=fused.SPARSE_BELOW,
    )


if __name__ == "__main__":
    main()
