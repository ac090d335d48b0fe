"""Time dictionary_learning's own SAE training step on cached activations.

Run with benchmarks/.venv-dictlearn/bin/python (see setup.sh). Prints one JSON
line to stdout; everything else goes to stderr.

What is timed, per step, is what `dictionary_learning.training.trainSAE` does
for one trainer in 0.1.0, minus logging/saving/tqdm:

    act = act.to(dtype=autocast_dtype)          # float32: a no-op
    with autocast_context:                      # nullcontext on CPU,
        trainer.update(step, act)               # torch.autocast(float32) on CUDA

`trainer.update` is the library's own step: zero_grad, loss (forward),
backward, ConstrainedAdam step (gradient projection + decoder renormalisation),
LambdaLR scheduler step.

  standard: trainers.StandardTrainer      with dictionary.AutoEncoder
  gated:    trainers.GatedSAETrainer      with dictionary.GatedAutoEncoder
"""

from __future__ import annotations

import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402


def run(args):
    import dictionary_learning
    import torch
    from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder
    from dictionary_learning.trainers import GatedSAETrainer, StandardTrainer

    acts = _common.load_acts(args.acts)
    d = int(acts.shape[1])
    d_sae = args.d_sae or 8 * d

    trainer_cls, dict_cls = {
        "standard": (StandardTrainer, AutoEncoder),
        "gated": (GatedSAETrainer, GatedAutoEncoder),
    }[args.arch]
    total_steps = args.warmup + args.steps
    # The library's default lr warm-up (1000 steps) and sparsity warm-up (2000
    # steps) must be shorter than `steps`, which a short benchmark is not; they
    # change only scalar factors, not the work per step, so both are turned off.
    trainer = trainer_cls(
        steps=total_steps,
        activation_dim=d,
        dict_size=d_sae,
        layer=0,
        lm_name="benchmark",
        dict_class=dict_cls,
        lr=args.lr,
        warmup_steps=0,
        sparsity_warmup_steps=None,
        seed=args.seed,
        device=args.device,
    )

    names = {"standard": {"encoder.weight": "W_enc", "encoder.bias": "b_enc", "decoder.weight": "W_dec",
                          "bias": "b_dec"},
             "gated": {"encoder.weight": "W_gate", "gate_bias": "b_gate", "r_mag": "r_mag", "mag_bias": "b_mag",
                       "decoder.weight": "W_dec", "decoder_bias": "b_dec"}}[args.arch]  # fmt: skip
    _common.load_into(dict(trainer.ae.named_parameters()), args.init_arrays, names, transpose=("decoder.weight",))

    autocast_dtype = torch.float32  # trainSAE's default
    autocast_context = (
        contextlib.nullcontext() if args.device == "cpu" else torch.autocast(device_type="cuda", dtype=autocast_dtype)
    )

    def one_step(step, act):
        # trainSAE loop body for one trainer, without logging/saving.
        act = act.to(dtype=autocast_dtype)
        with autocast_context:
            trainer.update(step, act)

    batches = _common.Batches(acts, args.batch, args.device)
    times = _common.time_steps(args, batches, one_step)
    with torch.no_grad():
        l0_after = _common.l0(trainer.ae.encode(batches.next()))  # outside the timed steps

    opt = trainer.optimizer
    notes = (
        f"timed: dictionary_learning trainSAE loop body per step "
        f"({trainer_cls.__name__}.update(step, act) on {dict_cls.__name__}); "
        f"no logging/saving/tqdm; optimizer {type(opt).__name__} "
        f"betas {tuple(opt.defaults['betas'])}, lr warm-up and sparsity warm-up off, "
        f"no resampling, no grad clipping (library has none here); " + _common.BATCH_NOTE
    )
    return dict(
        peer="dictionary_learning",
        version=dictionary_learning.__version__,
        d=d,
        d_sae=d_sae,
        times=times,
        notes=notes,
        sae_class=_common.qualname(dict_cls),
        trainer_class=_common.qualname(trainer_cls),
        l0_after=l0_after,
    )


if __name__ == "__main__":
    _common.main(__doc__.splitlines()[0], run)
