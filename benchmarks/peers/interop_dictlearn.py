"""dictionary_learning side of benchmarks/interop.py: write dictionary_learning folders with dictionary_learning.

Run with benchmarks/.venv-dictlearn/bin/python (see setup.sh); benchmarks/interop.py calls it. Prints one
JSON line to stdout; everything the library prints goes to stderr.

``export``: the library's own ``dictionary_learning.training.trainSAE`` trains one SAE of every class
dictionary_learning 0.1.0 has and circuitsae reads, side by side on the ``--fit`` rows, and saves each the
way it does (``trainer_i/config.json`` = ``{"trainer": trainer.config}`` when the folder is made,
``trainer_i/ae.pt`` = the ``state_dict`` at the end). Two calls:

  ``--steps`` steps: AutoEncoder (StandardTrainer), GatedAutoEncoder (GatedSAETrainer),
  JumpReluAutoEncoder (JumpReluTrainer), MatryoshkaBatchTopKSAE (MatryoshkaBatchTopKTrainer, groups
  1/4, 1/4, 1/2)
  ``--topk-steps`` steps (default 1): AutoEncoderTopK (TopKTrainer), BatchTopKSAE (BatchTopKTrainer). Their
  step costs ~45 s on 2 CPU threads with torch 2.13, nearly all in one einsum (a bmm over d_sae batches)
  in ``remove_gradient_parallel_to_decoder_directions``; one step still runs their b_dec initialisation
  (geometric median), an update, and (threshold_start_step −1) the BatchTopK threshold estimate.

Each is then written twice, and for each the library's class (its constructor, then
``load_state_dict(torch.load(ae.pt))``, which is what its ``from_pretrained`` does, less AutoEncoder's
optional decoder normalisation) gives ``encode(x)`` and ``decode(encode(x))`` on the ``--acts`` rows
(``codes.npy``, ``recon.npy``, and the decoder rows' norms in ``decoder_norms.npy``; for the randomised
AutoEncoder also ``codes_peer_folded.npy``/``recon_peer_folded.npy``, its codes and reconstructions after the library's own ``normalize_decoder()``,
which folds the norms as circuitsae does: the float32 yardstick for circuitsae's fold; and ``codes_f64.npy``,
``recon_f64.npy``: the same module in float64, the reference for the float32 rounding of both sides):

- ``trained``: the folder trainSAE wrote, as it is;
- ``randomised``: the same SAE with its biases, thresholds and decoder norms set to random but realistic
  values (seeded), saved as trainSAE saves (``torch.save`` of ``{k: v.cpu()}`` of the state dict, the
  same ``config.json``): decoder rows scaled by ``exp(0.3·N(0,1))`` (not for AutoEncoderTopK: a TopK SAE's
  decoder norms cannot be folded, and the library keeps them at 1), the decoder bias = the mean of the
  fit rows plus 0.1·their std·N(0,1), feature i firing on a fraction ``1 − q_i``, ``q_i ~ U(0.90,
  0.995)``, of the fit rows (AutoEncoder: the encoder bias; Gated: the gate bias, with ``r_mag ~
  0.3·N(0,1)`` and the magnitude bias random; JumpReLU: the threshold, with the encoder bias random); TopK,
  BatchTopK, Matryoshka: the encoder bias random, and the BatchTopK threshold buffers set to the mean
  over fit batches of the smallest value the library's batch top-k keeps (what its trainer averages).

There is no ``load`` direction: dictionary_learning 0.1.0 has no reader of SAE Lens folders (its
``JumpReluAutoEncoder.from_pretrained(load_from_sae_lens=True)`` downloads a SAE Lens release by name).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interop_common import cycle, export_parser, quantile_per_feature, rows, run  # noqa: E402
from _interop_common import encode_decode_numpy as encode_decode  # noqa: E402


def trainer_configs(args: argparse.Namespace, d: int, m: int) -> list[tuple[str, int, list[dict]]]:
    """(folder, steps, trainer configs) for each trainSAE call."""
    from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers import (
        BatchTopKTrainer,
        GatedSAETrainer,
        JumpReluTrainer,
        StandardTrainer,
        TopKTrainer,
    )
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

    def common(steps: int) -> dict:
        return dict(
            steps=steps,
            activation_dim=d,
            dict_size=m,
            layer=args.layer,
            lm_name=args.model,
            submodule_name=args.submodule,
            device="cpu",
            seed=args.seed,
            warmup_steps=0,  # the defaults (1000) must be shorter than the run
        )

    main, topk = common(args.steps), common(args.topk_steps)
    # threshold estimates (default: from step 1000) start a quarter in; -1: at step 0 (the update runs when step > it)
    start, topk_start = max(1, args.steps // 4), args.topk_steps // 2 - 1
    return [
        (
            "trainsae",
            args.steps,
            [
                dict(trainer=StandardTrainer, dict_class=AutoEncoder, sparsity_warmup_steps=None, **main),
                dict(trainer=GatedSAETrainer, dict_class=GatedAutoEncoder, sparsity_warmup_steps=None, **main),
                dict(trainer=JumpReluTrainer, dict_class=JumpReluAutoEncoder, sparsity_warmup_steps=None, **main),
                dict(
                    trainer=MatryoshkaBatchTopKTrainer,
                    k=args.k,
                    group_fractions=[0.25, 0.25, 0.5],
                    threshold_start_step=start,
                    **main,
                ),
            ],
        ),
        (
            "trainsae-topk",
            args.topk_steps,
            [
                dict(trainer=TopKTrainer, k=args.k, threshold_start_step=topk_start, **topk),
                dict(trainer=BatchTopKTrainer, k=args.k, threshold_start_step=topk_start, **topk),
            ],
        ),
    ]


def instance(cls_name: str, config: dict, sd: dict):
    """The library's class for a saved folder: constructor + load_state_dict (as its from_pretrained)."""
    from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    d, m = config["activation_dim"], config["dict_size"]
    if cls_name == "AutoEncoder":
        ae = AutoEncoder(d, m)
    elif cls_name == "GatedAutoEncoder":
        ae = GatedAutoEncoder(d, m)
    elif cls_name == "JumpReluAutoEncoder":
        ae = JumpReluAutoEncoder(d, m)
    elif cls_name == "AutoEncoderTopK":
        ae = AutoEncoderTopK(d, m, int(sd["k"]))
    elif cls_name == "BatchTopKSAE":
        ae = BatchTopKSAE(d, m, int(sd["k"]))
    elif cls_name == "MatryoshkaBatchTopKSAE":
        ae = MatryoshkaBatchTopKSAE(d, m, int(sd["k"]), sd["group_sizes"].tolist())
    else:
        raise SystemExit(f"unknown class {cls_name}")
    ae.load_state_dict(sd)
    return ae.eval()


def decoder_rows(ae) -> torch.Tensor:
    """Feature directions as rows, [dict_size, activation_dim] (nn.Linear decoders store their transpose)."""
    return ae.decoder.weight.T if hasattr(ae, "decoder") else ae.W_dec


@torch.no_grad()
def randomise(ae, cls_name: str, fit: torch.Tensor, seed: int) -> dict:
    """Biases, thresholds and decoder norms: random but realistic (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    d, m = ae.activation_dim, ae.dict_size

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    q = 0.90 + 0.095 * torch.rand(m, generator=g)
    scale = torch.exp(0.3 * randn(m))
    b_dec = fit.mean(0) + 0.1 * fit.std(0) * randn(d)
    if cls_name == "AutoEncoder":
        ae.decoder.weight.mul_(scale[None, :])
        ae.bias.copy_(b_dec)
        pre = ae.encoder(fit - ae.bias) - ae.encoder.bias
        ae.encoder.bias.copy_(-quantile_per_feature(pre, q))
    elif cls_name == "GatedAutoEncoder":
        ae.decoder.weight.mul_(scale[None, :])
        ae.decoder_bias.copy_(b_dec)
        ae.r_mag.copy_(0.3 * randn(m))
        x_enc = ae.encoder(fit - ae.decoder_bias)
        ae.gate_bias.copy_(-quantile_per_feature(x_enc, q))
        ae.mag_bias.copy_(0.2 * (ae.r_mag.exp() * x_enc).std(0) * randn(m))
    elif cls_name == "JumpReluAutoEncoder":  # encoder reads x itself (apply_b_dec_to_input = False)
        ae.W_dec.mul_(scale[:, None])
        ae.b_dec.copy_(b_dec)
        pre = fit @ ae.W_enc
        ae.b_enc.copy_(0.2 * pre.std(0) * randn(m))
        ae.threshold.copy_(quantile_per_feature(pre + ae.b_enc, q))
    else:  # the TopK family: encoder bias random; BatchTopK thresholds from the library's batch top-k
        if cls_name != "AutoEncoderTopK":
            if hasattr(ae, "decoder"):
                ae.decoder.weight.mul_(scale[None, :])
            else:
                ae.W_dec.mul_(scale[:, None])
        ae.b_dec.copy_(b_dec)
        lin = ae.encoder if hasattr(ae, "encoder") else None
        pre = lin(fit - ae.b_dec) - lin.bias if lin is not None else (fit - ae.b_dec) @ ae.W_enc
        bias = lin.bias if lin is not None else ae.b_enc
        bias.copy_(0.2 * pre.std(0) * randn(m))
        if cls_name != "AutoEncoderTopK":
            mins = []
            for s in range(0, fit.shape[0] - 511, 512):
                kept = ae.encode(fit[s : s + 512], use_threshold=False)
                mins.append(kept[kept > 0].min())
            ae.threshold.copy_(torch.stack(mins).mean())
            return {"threshold": float(ae.threshold)}
    return {}


def save_like_trainsae(ae, config: dict, folder: Path) -> None:
    """What trainSAE writes: config.json ({"trainer": trainer.config}) and ae.pt (the state dict on the CPU)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f, indent=4)
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, folder / "ae.pt")


def export(args: argparse.Namespace) -> dict:
    import dictionary_learning  # noqa: F401  (the package, as a user imports it)
    from dictionary_learning.training import trainSAE

    x, fit = rows(args.acts), rows(args.fit)
    d = x.shape[1]
    m = args.d_sae or 4 * d
    out = Path(args.out)

    sources = []
    for name, steps, configs in trainer_configs(args, d, m):
        print(f"[interop_dictlearn] trainSAE: {len(configs)} trainers, {steps} steps", file=sys.stderr, flush=True)
        trainSAE(
            data=cycle(fit, args.batch), trainer_configs=configs, steps=steps, save_dir=str(out / name), device="cpu"
        )
        sources += [out / name / f"trainer_{i}" for i in range(len(configs))]
    cases = []
    for i, src in enumerate(sources):
        config = json.loads((src / "config.json").read_text())
        cls_name = config["trainer"]["dict_class"]
        sd = torch.load(src / "ae.pt", weights_only=True)
        for variant in ("trained", "randomised"):
            folder = out / f"{cls_name}-{variant}"
            ae = instance(cls_name, config["trainer"], sd)
            note = {}
            if variant == "randomised":
                note = randomise(ae, cls_name, fit, args.seed + 100 + i)
                save_like_trainsae(ae, config, folder / "sae")
                ae = instance(cls_name, config["trainer"], torch.load(folder / "sae" / "ae.pt", weights_only=True))
            else:
                (folder / "sae").mkdir(parents=True, exist_ok=True)
                for name in ("ae.pt", "config.json"):
                    (folder / "sae" / name).write_bytes((src / name).read_bytes())
            codes, recon = encode_decode(ae, x)
            norms = decoder_rows(ae).detach().norm(dim=-1)
            np.save(folder / "codes.npy", codes)
            np.save(folder / "recon.npy", recon)
            np.save(folder / "decoder_norms.npy", norms.float().numpy())
            c64, r64 = encode_decode(copy.deepcopy(ae).double(), x.double())  # the same maths in float64
            np.save(folder / "codes_f64.npy", c64)
            np.save(folder / "recon_f64.npy", r64)
            if cls_name == "AutoEncoder" and variant == "randomised":  # the library's own fold of the norms
                ae.normalize_decoder()
                fold_codes, fold_recon = encode_decode(ae, x)
                np.save(folder / "codes_peer_folded.npy", fold_codes)
                np.save(folder / "recon_peer_folded.npy", fold_recon)
            cases.append(
                {
                    "architecture": f"{cls_name}-{variant}",
                    "dict_class": cls_name,
                    "trainer_class": config["trainer"]["trainer_class"],
                    "variant": variant,
                    "decoder_norms": [float(norms.min()), float(norms.max())],
                    "threshold_buffer": float(sd["threshold"]) if "threshold" in sd and sd["threshold"].ndim == 0
                    else None,
                    **note,
                }
            )  # fmt: skip
    import importlib.metadata

    return {
        "peer": "dictionary_learning",
        "version": importlib.metadata.version("dictionary-learning"),
        "torch": torch.__version__,
        "d": d,
        "d_sae": m,
        "steps": args.steps,
        "topk_steps": args.topk_steps,
        "batch": args.batch,
        "cases": cases,
    }


def main() -> None:
    p, _, e = export_parser(__doc__.splitlines()[0], "dictionary_learning trains and saves, dictionary_learning encodes",
                            steps=20)  # fmt: skip
    e.add_argument(
        "--topk-steps",
        type=int,
        default=1,
        help="steps for TopKTrainer and BatchTopKTrainer: ~45 s each on 2 CPU threads (torch 2.13), in "
        "remove_gradient_parallel_to_decoder_directions's einsum",
    )
    e.add_argument("--layer", type=int, default=6)
    e.add_argument("--submodule", default="resid_post_layer_6")
    run(p, export)


if __name__ == "__main__":
    main()
