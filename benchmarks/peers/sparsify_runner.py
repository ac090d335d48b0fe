"""sparsify's own all-layer training path: ``Trainer.fit()`` on forward passes of the model.

Run with benchmarks/.venv-sparsify/bin/python (see setup.sh). Prints one JSON line to stdout; everything the
library prints (and tqdm) goes to stderr.

The model (``--model-dir``, a local HF folder) is the base model (``AutoModelForCausalLM(...).base_model``,
no LM head: what sparsify's CLI loads with ``AutoModel`` for ``loss_fn="fvu"``) in float32 on the CPU. The
contexts of ``--tokens`` (.npy int64 ``[n_contexts, ctx_len]``) become a ``datasets.Dataset`` with one
``input_ids`` column (torch format), in file order: sparsify's ``Trainer`` reads it with
``DataLoader(batch_size=--batch-seqs, shuffle=False)``, so every context is trained on once, in this order
(its CLI would shuffle first; this runner does not).
``n_contexts`` must divide by ``--batch-seqs``: a final partial batch would be trained at lr 0 (the Adam
schedule ends at ``n_contexts // batch_seqs`` steps).

The config is sparsify's ``RunConfig`` (its CLI's ``TrainConfig`` subclass, so the run's ``config.json``
records the model and ``ctx_len``): ``SparseCoderConfig(activation="topk", num_latents, k, multi_topk=False,
normalize_decoder=True)``, ``hookpoints=["layers.{i}", ...]`` (relative to ``model.base_model``: the output
of decoder layer i, the residual stream after block i), ``optimizer="adam"``, ``loss_fn="fvu"``,
``batch_size=--batch-seqs``, ``grad_acc_steps=1``, ``micro_acc_steps=1``, ``auxk_alpha`` (default 0,
sparsify's), ``init_seeds=[--seed]``, ``save_every=n_steps + 2`` (only ``fit()``'s final save),
``log_to_wandb=False``, no ``torch.distributed``. See ``NOTES`` for what that path does.

Timed: ``trainer.fit()`` with ``time.perf_counter``. Not timed: model and token loading, building the
dataset, ``Trainer(...)`` (SAE construction, the optimizer, one dummy forward to find widths). Inside the
timed region besides the training steps: ``fit()``'s set-up (a DataLoader, tqdm) and its final
``save()`` (every SAE plus the Adam state); ``save()`` is wrapped in a timer, so ``save_seconds`` is
reported separately and ``tokens_per_s_excl_save`` leaves it out.

sparsify sets the decoder rows to unit norm before each SAE forward, not after the optimizer step, so the
SAEs it saves are one update off unit norm (``decoder_norm_range_as_trained``). ``--renorm-decoder``
renormalises them after the timed region, with sparsify's own method, and saves them again.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

NOTES = [
    "optimizer: optimizer='adam' is set (sparsify's default is 'signum': SignSGD in schedulefree's "
    "ScheduleFreeWrapper, momentum 0.95, auto lr 5e-3/sqrt(num_latents/2^14)); with 'adam' sparsify uses "
    "bitsandbytes' Adam8bit when it imports, else torch.optim.Adam (betas 0.9/0.999, eps 1e-8) with one "
    "param group per SAE; 'adam_class' says which ran",
    "lr: --lr, else sparsify's Adam auto-lr 2e-4/sqrt(num_latents/2^14) (3.77e-4 at 4608 latents)",
    "lr schedule (forced with adam): transformers' get_linear_schedule_with_warmup(lr_warmup_steps, "
    "n_steps): linear warm-up from 0 (step 0 has lr 0 unless lr_warmup_steps=0), then linear decay "
    "reaching 0 just after the last step; no constant-lr option exists. sparsify's default "
    "lr_warmup_steps=1000 is longer than short runs, so the runner sets round(1% of the steps) (circuitsae "
    "warms up over 1% of the steps, lr*min(1,(step+1)/w), so its step 0 is not at lr 0) unless "
    "--lr-warmup-steps says otherwise",
    "loss: FVU per layer = sum||y - y_hat||^2 / sum||y - mean_batch(y)||^2 over the batch's tokens; each "
    "layer's SAE does its own forward and backward inside that layer's forward hook (no end-to-end loss)",
    "AuxK: off (sparsify's default auxk_alpha=0; --auxk-alpha turns it on); a latent counts as dead after "
    "dead_feature_threshold=10,000,000 tokens without firing; k_aux = d_in/2, scaled by min(dead/k_aux, 1), "
    "divided by the batch variance; firing counts are kept every step even with AuxK off",
    "init: encoder nn.Linear default init with zero bias, W_dec = a copy of encoder.weight, rows at unit "
    "norm; torch.manual_seed(seed) is reset before EACH layer's SAE, so all layers start from the same "
    "weights; b_dec = the mean of the first batch's activations of its layer (step 0)",
    "decoder: rows set to unit norm before every SAE forward (inside the hook), and the gradient component "
    "parallel to each row removed before every optimizer step; the rows are NOT renormalised after the "
    "last step, so the saved W_dec rows are one Adam step off unit norm (0.9996-1.00001 after 32 steps in "
    "the tiny check); circuitsae's reader refuses a TopK whose row norms differ by more than 1e-5, so "
    "--renorm-decoder (untimed, sparsify's own set_decoder_norm_to_unit_norm, then save_to_disk again) is "
    "needed for circuitsae to read them; decoder_norm_range_as_trained reports the norms before it",
    "activations: the raw residual stream, not normalised or scaled, not shuffled: each step trains on all "
    "batch_seqs*ctx_len tokens of that step's contexts at once, position 0 included unless its token id is "
    "in --exclude-tokens (exclude_tokens drops every occurrence of those ids; circuitsae's harvest drops "
    "position 0 only)",
    "precision: SAEs and model in float32 on the CPU; SparseCoder.forward's autocast is for 'cuda' only "
    "(bf16 when torch.cuda.is_bf16_supported()), so nothing runs in bf16 here; fit() calls "
    "torch.set_float32_matmul_precision('high') (TF32 on CUDA); see 'matmul_precision' for what it set here",
    "multi_topk off (sparsify's default); grad_acc_steps=1 and micro_acc_steps=1 (defaults): one "
    "optimizer step per batch_seqs contexts",
    "decoder kernel: Triton is absent on this CPU venv, so sparsify's eager decoder "
    "(nn.functional.embedding_bag) is used; its encoder is its own FusedEncoder (dense linear + ReLU + topk, "
    "index_add backward)",
    "model forward: the full base model runs every step (no early stop after the last hooked layer), without "
    "the LM head, as sparsify's CLI loads it for loss_fn='fvu' (AutoModel; the runner takes "
    "AutoModelForCausalLM(...).base_model, because circuitsae's SmolLM2 folder stores the tied embedding only "
    "as lm_head.weight and AutoModel would leave embed_tokens random); not under torch.no_grad, but no model "
    "parameter requires grad",
    "checkpoints: fit() saves when (optimizer step + 1) % save_every == 0 (default save_every=1000: after 999, "
    "1999, ... steps; set to n_steps+2 here so that none falls inside the run) and once at the end, "
    "inside the timed region: save_dir/<run>/layers.i/{cfg.json,sae.safetensors} per SAE plus optimizer_0.pt "
    "(the Adam state), lr_scheduler_0.pt, state.pt, rank_0_state.pt and config.json; save_seconds times it",
    "per-step extras inside fit(): tokens_mask = isin(input_ids, exclude_tokens) and its .item() sum, "
    "a detached clone of every hooked layer's output, the batch variance, float(fvu) per layer (a host "
    "sync; the FVU is always accumulated for logging, wandb or not), the did_fire/num_tokens_since_fired "
    "bookkeeping, a tqdm update; with log_to_wandb=False nothing else is logged",
    "this runner adds a forward hook on each SparseCoder that keeps a reference to out.fvu (no sync) for "
    "train_fvu_last_step: the FVU of each layer on the last batch, before that batch's update",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, help="a local HF model folder")
    p.add_argument("--tokens", required=True, help=".npy int64 [n_contexts, ctx_len] token ids, trained in order")
    p.add_argument("--layers", default="all", help="'all' or comma-separated decoder layer indices (default all)")
    p.add_argument("--num-latents", type=int, default=4608, help="SAE width")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-seqs", type=int, default=32, help="contexts per step")
    p.add_argument("--lr", type=float, default=None, help="Adam lr (default: sparsify's auto-lr)")
    p.add_argument("--lr-warmup-steps", type=int, default=None, help="default: 1%% of the steps, rounded")
    p.add_argument("--auxk-alpha", type=float, default=0.0, help="sparsify's AuxK weight (default 0: off)")
    p.add_argument("--exclude-tokens", default="", help="comma-separated token ids sparsify leaves out")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--out", required=True, help="sparsify save_dir")
    p.add_argument("--run-name", default="run", help="sparsify run_name (the subfolder of --out)")
    p.add_argument("--seed", type=int, default=0, help="sparsify init_seeds=[seed]")
    p.add_argument(
        "--renorm-decoder",
        action="store_true",
        help="after fit() (untimed), set each SAE's decoder rows to unit norm with sparsify's own "
        "set_decoder_norm_to_unit_norm() (what its next step would do first) and save it again with save_to_disk",
    )
    args = p.parse_args()
    if args.num_latents < 1 or args.k < 1 or args.k > args.num_latents or args.batch_seqs < 1 or args.threads < 1:
        p.error("need --num-latents >= 1, 1 <= --k <= --num-latents, --batch-seqs >= 1, --threads >= 1")
    if args.lr_warmup_steps is not None and args.lr_warmup_steps < 0:
        p.error("--lr-warmup-steps must be >= 0")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        p.error("--lr must be a positive number")
    return args


def load_tokens(path: str, batch_seqs: int) -> np.ndarray:
    tokens = np.load(path)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise SystemExit(
            f"--tokens must be a 2-D integer array [n_contexts, ctx_len], got {tokens.dtype} {tokens.shape}"
        )
    if tokens.shape[0] < batch_seqs or tokens.shape[0] % batch_seqs:
        raise SystemExit(
            f"--tokens has {tokens.shape[0]} contexts: it must be a positive multiple of --batch-seqs "
            f"({batch_seqs}); sparsify would train a final partial batch at lr 0"
        )
    return tokens.astype(np.int64, copy=False)


def run(args: argparse.Namespace) -> dict:
    import datasets
    import sparsify.trainer as sparsify_trainer
    from sparsify import SparseCoderConfig, Trainer
    from sparsify.__main__ import RunConfig
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    tokens = load_tokens(args.tokens, args.batch_seqs)
    n_ctx, ctx_len = tokens.shape
    steps = n_ctx // args.batch_seqs

    # The base model (no LM head), as sparsify's CLI loads it for loss_fn="fvu" (AutoModel). It is taken
    # from AutoModelForCausalLM: a folder that stores tied embeddings only as lm_head.weight (circuitsae's
    # SmolLM2 folder does) loads through AutoModel with embed_tokens left at random init.
    lm = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, device_map={"": "cpu"})
    model = lm.base_model
    model.eval()
    head, emb = lm.get_output_embeddings(), model.get_input_embeddings()
    if lm.config.tie_word_embeddings and head is not None and not torch.equal(head.weight, emb.weight):
        raise SystemExit("the model's tied input and output embeddings differ after loading")
    del lm, head
    n_layers = int(model.config.num_hidden_layers)
    try:
        layers = list(range(n_layers)) if args.layers == "all" else [int(s) for s in args.layers.split(",") if s]
        exclude = [int(s) for s in args.exclude_tokens.split(",") if s]
    except ValueError:
        raise SystemExit("--layers ('all' or e.g. 0,14,29) and --exclude-tokens take integers") from None
    if not layers or any(not 0 <= i < n_layers for i in layers) or len(set(layers)) != len(layers):
        raise SystemExit(f"--layers must name distinct layers in 0..{n_layers - 1}, got {args.layers!r}")
    if int(tokens.max()) >= model.config.vocab_size or int(tokens.min()) < 0:
        raise SystemExit(f"--tokens holds ids outside [0, {model.config.vocab_size})")
    trained_tokens = int((~np.isin(tokens, exclude)).sum())

    dataset = datasets.Dataset.from_dict({"input_ids": tokens}).with_format("torch")
    warmup = args.lr_warmup_steps if args.lr_warmup_steps is not None else round(0.01 * steps)
    cfg = RunConfig(
        sae=SparseCoderConfig(activation="topk", num_latents=args.num_latents, k=args.k),
        model=args.model_dir,
        dataset=args.tokens,
        ctx_len=ctx_len,
        batch_size=args.batch_seqs,
        grad_acc_steps=1,
        micro_acc_steps=1,
        loss_fn="fvu",
        optimizer="adam",
        lr=args.lr,
        lr_warmup_steps=warmup,
        auxk_alpha=args.auxk_alpha,
        exclude_tokens=exclude,
        hookpoints=[f"layers.{i}" for i in layers],
        init_seeds=[args.seed],
        # fit() saves when (global_step + 2) % save_every == 0 (its `step` is already 1-based), then once
        # at the end: this value leaves only the final save.
        save_every=steps + 2,
        log_to_wandb=False,
        run_name=args.run_name,
        save_dir=args.out,
        shuffle_seed=0,  # recorded only: the CLI shuffles with it, this runner does not
    )
    trainer = Trainer(cfg, dataset, model)
    hooks = list(trainer.cfg.hookpoints)
    adam = trainer.optimizers[0]
    lr_used = float(adam.param_groups[0]["initial_lr"])

    # Per-layer FVU of the last batch: keep a reference to out.fvu (no host sync, no copy).
    last_fvu: dict[str, torch.Tensor] = {}
    for name, sae in trainer.saes.items():
        sae.register_forward_hook(lambda _m, _i, out, name=name: last_fvu.__setitem__(name, out.fvu.detach()))

    save_times: list[float] = []
    save = trainer.save

    def timed_save() -> None:
        t = time.perf_counter()
        save()
        save_times.append(time.perf_counter() - t)

    trainer.save = timed_save
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    if trainer.global_step != steps:
        raise SystemExit(f"sparsify ran {trainer.global_step} steps, expected {steps}")

    # sparsify renormalises W_dec before each forward, not after the last step: the saved rows are off unit
    # norm by that step's update (circuitsae's reader refuses a TopK whose norms differ by more than 1e-5).
    norms = {}
    for name, sae in trainer.saes.items():
        n = sae.W_dec.detach().norm(dim=1)
        norms[name] = [float(n.min()), float(n.max())]
        if args.renorm_decoder:
            sae.set_decoder_norm_to_unit_norm()
            sae.save_to_disk(Path(args.out) / args.run_name / name)

    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    save_seconds = sum(save_times)
    fvu = {name: float(v) for name, v in last_fvu.items()}
    run_dir = Path(args.out) / args.run_name
    return {
        "peer": "sparsify",
        "version": importlib.metadata.version("eai-sparsify"),
        "torch": torch.__version__,
        "tokens": trained_tokens,
        "seconds": seconds,
        "tokens_per_s": trained_tokens / seconds,
        "save_seconds": save_seconds,
        "tokens_per_s_excl_save": trained_tokens / (seconds - save_seconds),
        "steps": steps,
        "layers": layers,
        "hookpoints": hooks,
        "num_latents": args.num_latents,
        "k": args.k,
        "batch_seqs": args.batch_seqs,
        "n_contexts": n_ctx,
        "ctx_len": ctx_len,
        "lr": lr_used,
        "lr_given": args.lr,
        "lr_warmup_steps": warmup,
        "lr_schedule": "linear warm-up, then linear decay to 0 (transformers get_linear_schedule_with_warmup)",
        "auxk_alpha": args.auxk_alpha,
        "dead_feature_threshold": cfg.dead_feature_threshold,
        "exclude_tokens": exclude,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "adam_class": f"{type(adam).__module__}.{type(adam).__qualname__}",
        "decoder_impl": sparsify_trainer.SparseCoder.decode.__globals__["decoder_impl"].__name__,
        "matmul_precision": {
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "mkldnn_fp32_precision": getattr(mkldnn, "fp32_precision", None),
        },
        "cuda_bf16_autocast": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
        "decoder_norm_range_as_trained": norms,
        "decoder_renormalised": args.renorm_decoder,
        "train_fvu_last_step": fvu,
        "train_fvu_last_step_mean": sum(fvu.values()) / len(fvu),
        "save_folder": os.path.relpath(run_dir),
        "sae_folders": f"{os.path.relpath(run_dir)}/layers.<i>",
        "notes": NOTES,
    }


def main() -> None:
    args = parse_args()
    with contextlib.redirect_stdout(sys.stderr):
        record = run(args)
    sys.__stdout__.write(json.dumps(record) + "\n")
    sys.__stdout__.flush()


if __name__ == "__main__":
    main()
