"""Time SAE Lens's own SAE training step on cached activations.

Run with benchmarks/.venv-saelens/bin/python (see setup.sh). Prints one JSON
line to stdout; everything else goes to stderr.

What is timed, per step, is the body of `SAETrainer.fit()`'s loop in
sae_lens 6.54.12 minus wandb logging/evals and the tqdm progress bar:

    trainer.maybe_reset_sparsity()      # sparsity-window bookkeeping
    trainer.step(batch)                 # -> SAETrainer._train_step: sae.train(),
                                        #    training_forward_pass, firing stats,
                                        #    loss.backward, clip_grad_norm_(1.0),
                                        #    Adam step, zero_grad, lr + coefficient
                                        #    scheduler steps
    trainer._checkpoint_if_needed()     # no checkpoints configured: a no-op check
    trainer.n_training_steps += 1

with a real `sae_lens.training.sae_trainer.SAETrainer` driving a
`StandardTrainingSAE` or `GatedTrainingSAE`, so it is the library's code path,
not a re-implementation.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402


def run(args):
    import sae_lens
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.standard_sae import (
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
    )
    from sae_lens.training.sae_trainer import SAETrainer

    acts = _common.load_acts(args.acts)
    d = int(acts.shape[1])
    d_sae = args.d_sae or 8 * d

    sae_cls, cfg_cls = {
        "standard": (StandardTrainingSAE, StandardTrainingSAEConfig),
        "gated": (GatedTrainingSAE, GatedTrainingSAEConfig),
    }[args.arch]
    # Library defaults otherwise (l1_coefficient=1.0, apply_b_dec_to_input=True,
    # normalize_activations="none", decoder_init_norm=0.1).
    sae = sae_cls(cfg_cls(d_in=d, d_sae=d_sae, dtype="float32", device=args.device))

    total_steps = args.warmup + args.steps
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total_steps * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr / 10,  # what LanguageModelSAERunnerConfig fills in
        lr_scheduler_name="constant",
        device=args.device,
        autocast=False,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()), evaluator=None)
    trainer.sae.to(args.device)  # as SAETrainer.fit() does first
    names = {"standard": {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"},
             "gated": {"W_enc": "W_gate", "b_gate": "b_gate", "r_mag": "r_mag", "b_mag": "b_mag", "W_dec": "W_dec",
                       "b_dec": "b_dec"}}[args.arch]  # fmt: skip
    _common.load_into(dict(sae.named_parameters()), args.init_arrays, names, transpose=("W_enc",))

    def one_step(step, x):
        # SAETrainer.fit() loop body without wandb logging / evals / pbar.
        trainer.maybe_reset_sparsity()
        trainer.step(x)
        trainer._checkpoint_if_needed()
        trainer.n_training_steps += 1

    batches = _common.Batches(acts, args.batch, args.device)
    times = _common.time_steps(args, batches, one_step)
    l0_after = _common.l0(sae.encode(batches.next()))  # outside the timed steps

    notes = (
        f"timed: sae_lens SAETrainer.fit() loop body per step "
        f"(maybe_reset_sparsity + SAETrainer.step -> _train_step + "
        f"_checkpoint_if_needed) on {sae_cls.__name__}; no wandb/evals/pbar; "
        f"Adam betas {tuple(trainer.optimizer.defaults['betas'])}, constant lr, clip_grad_norm 1.0, autocast off; "
        + _common.BATCH_NOTE
    )
    return dict(
        peer="sae-lens",
        version=sae_lens.__version__,
        d=d,
        d_sae=d_sae,
        times=times,
        notes=notes,
        sae_class=_common.qualname(sae_cls),
        trainer_class=_common.qualname(SAETrainer),
        l0_after=l0_after,
    )


if __name__ == "__main__":
    _common.main(__doc__.splitlines()[0], run)
