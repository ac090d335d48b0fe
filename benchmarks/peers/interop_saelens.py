"""SAE Lens side of benchmarks/interop.py: write SAE Lens folders with SAE Lens, and read circuitsae's with it.

Run with benchmarks/.venv-saelens/bin/python (see setup.sh); benchmarks/interop.py calls it. Prints one
JSON line to stdout; everything the library prints goes to stderr.

``export``: for every architecture SAE Lens 6.54 trains and circuitsae reads, build the library's own
training SAE (``StandardTrainingSAE``, ``GatedTrainingSAE``, ``JumpReLUTrainingSAE`` (also with
``apply_b_dec_to_input=False``, as Gemma Scope's are), ``TopKTrainingSAE``, ``BatchTopKTrainingSAE``),
train it for ``--steps`` steps with ``SAETrainer.fit()`` on the ``--fit`` rows, then set its biases,
thresholds and decoder norms to random but realistic values (below), and save it with
``save_inference_model`` (what ``LanguageModelSAETrainingRunner.save_final_sae`` calls: BatchTopK is
written as a JumpReLU, TopK's decoder norms are folded). The folder is then read back with
``SAE.load_from_disk`` and that SAE's ``encode(x)`` and ``decode(encode(x))`` on the ``--acts`` rows are
written to ``codes.npy`` and ``recon.npy`` (and the saved decoder rows' norms to ``decoder_norms.npy``;
``codes_peer_folded.npy``, ``recon_peer_folded.npy``: the codes and reconstructions of ``SAE.load_from_disk(..., fold_W_dec_norm=True)``, SAE Lens's own fold
of the decoder norms into the encoder, the float32 yardstick for circuitsae's fold; ``codes_f64.npy`` and
``recon_f64.npy``: the same SAE loaded with ``dtype="float64"`` encoding the rows in float64, the reference
that shows how far the library's own float32 codes are from exact).

Random but realistic, after the short training (seeded): decoder rows scaled by ``exp(0.3·N(0,1))`` (SAE
Lens does not hold them at unit norm); ``b_dec`` = the mean of the fit rows plus 0.1·their std·N(0,1);
the firing fraction of feature i set to ``1 − q_i``, ``q_i ~ U(0.90, 0.995)``, with the per-feature
quantile of its pre-activation on the fit rows (standard: ``b_enc``; gated: ``b_gate``, with
``r_mag ~ 0.3·N(0,1)`` and ``b_mag`` random; jumprelu: ``threshold``, with ``b_enc`` random);
topk and batchtopk: ``b_enc`` random, k = ``--k``, and batchtopk's ``topk_threshold`` set to the mean over
fit batches of the smallest positive BatchTopK activation (the value its training average tends to).

``load``: read each ``DIR/sae`` (written by circuitsae with ``save(path, format="saelens")``) with
``SAE.load_from_disk`` and write its ``encode``/``decode`` on the ``--acts`` rows to ``DIR/peer_codes.npy``
and ``DIR/peer_recon.npy``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interop_common import cycle, export_parser, quantile_per_feature, rows, run  # noqa: E402
from _interop_common import encode_decode_numpy as encode_decode  # noqa: E402

ARCHS = ("standard", "gated", "jumprelu", "jumprelu_no_b_dec_in", "topk", "batchtopk")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def build(arch: str, d: int, d_sae: int, k: int):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    base = dict(d_in=d, d_sae=d_sae, dtype="float32", device="cpu")
    if arch == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(**base))
    if arch == "gated":
        return GatedTrainingSAE(GatedTrainingSAEConfig(**base))
    if arch == "jumprelu":
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**base))
    if arch == "jumprelu_no_b_dec_in":
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**base, apply_b_dec_to_input=False))
    if arch == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(**base, k=k))
    if arch == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**base, k=k))
    raise SystemExit(f"unknown architecture {arch}")


def train(sae, fit: torch.Tensor, args: argparse.Namespace) -> None:
    """``args.steps`` steps of SAE Lens's own ``SAETrainer.fit()`` (no wandb, no checkpoints)."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr / 10,
        lr_scheduler_name="constant",
        device="cpu",
        autocast=False,
        logger=LoggingConfig(log_to_wandb=False),
    )
    SAETrainer(cfg=cfg, sae=sae, data_provider=cycle(fit, args.batch), evaluator=None).fit()


@torch.no_grad()
def randomise(sae, arch: str, fit: torch.Tensor, seed: int) -> dict:
    """Biases, thresholds and decoder norms: random but realistic (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    m = sae.cfg.d_sae

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    q = 0.90 + 0.095 * torch.rand(m, generator=g)
    sae.W_dec.mul_(torch.exp(0.3 * randn(m))[:, None])
    sae.b_dec.copy_(fit.mean(0) + 0.1 * fit.std(0) * randn(fit.shape[1]))
    xc = fit - sae.b_dec * sae.cfg.apply_b_dec_to_input
    note = {}
    if arch == "gated":
        sae.r_mag.copy_(0.3 * randn(m))
        gate = xc @ sae.W_enc
        sae.b_gate.copy_(-quantile_per_feature(gate, q))
        mag = xc @ (sae.W_enc * sae.r_mag.exp())
        sae.b_mag.copy_(0.2 * mag.std(0) * randn(m))
    else:
        pre = xc @ sae.W_enc
        if arch == "standard":
            sae.b_enc.copy_(-quantile_per_feature(pre, q))
        else:
            sae.b_enc.copy_(0.2 * pre.std(0) * randn(m))
        if arch.startswith("jumprelu"):
            sae.threshold.copy_(quantile_per_feature(pre + sae.b_enc, q).clamp_min(0))
        if arch == "batchtopk":
            mins = []
            for s in range(0, fit.shape[0] - 511, 512):
                acts, _ = sae.encode_with_hidden_pre(fit[s : s + 512])  # the library's BatchTopK (training form)
                mins.append(acts[acts > 0].min().double())
            sae.topk_threshold = torch.stack(mins).mean()
            note["topk_threshold"] = float(sae.topk_threshold)
    return note


def export(args: argparse.Namespace) -> dict:
    import sae_lens
    from sae_lens import SAE

    x, fit = rows(args.acts), rows(args.fit)
    d = x.shape[1]
    d_sae = args.d_sae or 4 * d
    out = Path(args.out)
    cases = []
    for i, arch in enumerate(args.archs):
        print(f"[interop_saelens] {arch}: build, train {args.steps} steps, save", file=sys.stderr, flush=True)
        torch.manual_seed(args.seed + i)
        sae = build(arch, d, d_sae, args.k)
        sae.cfg.metadata.model_name = args.model
        sae.cfg.metadata.hook_name = args.hook
        sae.cfg.metadata.context_size = args.context_size
        train(sae, fit, args)
        note = randomise(sae, arch, fit, args.seed + 100 + i)
        folder = out / arch
        sae.save_inference_model(folder / "sae")
        sae.eval()
        own_codes, _ = encode_decode(sae, x) if arch != "batchtopk" else (None, None)
        loaded = SAE.load_from_disk(folder / "sae")
        codes, recon = encode_decode(loaded, x)
        np.save(folder / "codes.npy", codes)
        np.save(folder / "recon.npy", recon)
        np.save(folder / "decoder_norms.npy", loaded.W_dec.detach().norm(dim=-1).float().numpy())
        # SAE Lens's own fold of the decoder norms (what circuitsae does on reading): how far its codes / norms
        # move from its unfolded codes in float32 is the yardstick for circuitsae's
        folded = SAE.load_from_disk(folder / "sae", fold_W_dec_norm=True)
        fold_codes, fold_recon = encode_decode(folded, x)
        np.save(folder / "codes_peer_folded.npy", fold_codes)
        np.save(folder / "recon_peer_folded.npy", fold_recon)
        c64, r64 = encode_decode(SAE.load_from_disk(folder / "sae", dtype="float64"), x.double())
        np.save(folder / "codes_f64.npy", c64)
        np.save(folder / "recon_f64.npy", r64)
        cfg = json.loads((folder / "sae" / "cfg.json").read_text())
        norms = loaded.W_dec.detach().norm(dim=-1)
        cases.append(
            {
                "architecture": arch,
                "training_class": type(sae).__name__,
                "saved_architecture": cfg["architecture"],
                "loaded_class": type(loaded).__name__,
                "apply_b_dec_to_input": cfg.get("apply_b_dec_to_input"),
                "rescale_acts_by_decoder_norm": cfg.get("rescale_acts_by_decoder_norm"),
                "k": cfg.get("k"),
                "decoder_norms": [float(norms.min()), float(norms.max())],
                # the training SAE's own encode vs the one SAE Lens loads from the folder (BatchTopK's training
                # encode is a batch TopK, not its inference JumpReLU)
                "saved_vs_in_memory_codes_rel": rel(torch.from_numpy(codes), torch.from_numpy(own_codes))
                if own_codes is not None
                else None,
                **note,
            }
        )
    return {
        "peer": "sae-lens",
        "version": sae_lens.__version__,
        "torch": torch.__version__,
        "d": d,
        "d_sae": d_sae,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "cases": cases,
    }


def load(args: argparse.Namespace) -> dict:
    import sae_lens
    from sae_lens import SAE

    x = rows(args.acts)
    cases = []
    for folder in map(Path, args.dirs):
        print(f"[interop_saelens] load {folder.name} with SAE.load_from_disk", file=sys.stderr, flush=True)
        sae = SAE.load_from_disk(folder / "sae")
        codes, recon = encode_decode(sae, x)
        np.save(folder / "peer_codes.npy", codes)
        np.save(folder / "peer_recon.npy", recon)
        cases.append({"dir": folder.name, "loaded_class": type(sae).__name__, "architecture": sae.cfg.architecture()})
    return {"peer": "sae-lens", "version": sae_lens.__version__, "torch": torch.__version__, "cases": cases}


def main() -> None:
    p, sub, e = export_parser(__doc__.splitlines()[0], "SAE Lens saves, SAE Lens encodes", steps=40, lr=3e-4)
    e.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    e.add_argument("--hook", default="blocks.6.hook_resid_post")
    e.add_argument("--context-size", type=int, default=128)
    lo = sub.add_parser("load", help="SAE Lens loads circuitsae's SAE Lens folders and encodes")
    lo.add_argument("--acts", required=True)
    lo.add_argument("--dirs", nargs="+", required=True, help="folders holding sae/ (cfg.json + sae_weights)")
    lo.add_argument("--threads", type=int, default=2)
    run(p, lambda args: export(args) if args.cmd == "export" else load(args))


if __name__ == "__main__":
    main()
