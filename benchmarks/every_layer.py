"""Full-stack SAE sets: a TopK SAE at every residual, attention and MLP site of a model, trained straight from the
model's forward passes, then a per-site table and plot (FVU, L0, loss recovered, dead fraction by layer).

    python benchmarks/every_layer.py --model smollm2-135m      # 90 sites, ~50 min on 2 CPU cores
    python benchmarks/every_layer.py --model gemma3-270m       # 54 sites
    python benchmarks/every_layer.py --plot-only               # every_layer.png from the JSON files there

The SAEs go to ``runs/bench/every_layer/<model>/`` (kept out of git; the same command resumes an interrupted
training and rebuilds them). Results: ``benchmarks/results/every_layer-<model>.json`` (settings, the machine, the
training's time and tokens/s, one row per site) and ``benchmarks/results/every_layer.png`` (one row of panels per
model whose JSON is there, one line per site kind).

Width and batch: 2× d (1,152 latents on SmolLM2), 2,048 rows a step, 500k tokens per site: on 2 CPU cores the 90
SAEs' steps, more than the forward passes, set the time, and these keep a set near an hour.

Architecture: TopK (Gao et al.), k = 32. In ``pareto.json`` (SmolLM2 resid.6, 4× width, 1M tokens) TopK and
BatchTopK at L0 32 are equal within noise (FVU 0.085 vs 0.088, loss recovered 0.984 vs 0.985), JumpReLU leaves
22–70% of its features dead at mid-range L0, and ReLU/Gated need a sparsity coefficient per site; TopK fixes every
token's L0 at k at every site (a circuit's node count per token is then the same everywhere) with no per-site
tuning, and it is what sparsify trains, so the throughput comparison is like for like.

Loss recovered splices one site's SAE at a time on held-out contexts (:func:`circuitsae.training.evaluate.fidelity`:
the clean run, the site zero-ablated, the site spliced): two forward passes per site per batch, so ``--contexts`` is
kept small on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe, repo_path  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
KIND_COLOURS = {"resid": "tab:blue", "attn": "tab:orange", "mlp": "tab:green"}


def parse_args(argv: "list[str] | None" = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sites", nargs="+", default=["all"])
    ap.add_argument("--tokens", type=int, default=500_000, help="training tokens per site")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--buffer-rows", type=int, default=1 << 15)
    ap.add_argument("--chunk-contexts", type=int, default=64)
    ap.add_argument("--model-batch", type=int, default=16)
    ap.add_argument("--eval-rows", type=int, default=16384, help="held-out rows per site for FVU, L0, dead fraction")
    ap.add_argument("--contexts", type=int, default=8, help="held-out contexts for loss recovered")
    ap.add_argument("--checkpoint-every", type=int, default=20, help="steps between checkpoints (the resume points)")
    ap.add_argument("--work", default="runs/bench/every_layer")
    ap.add_argument("--device", default=None)
    ap.add_argument("--plot-only", action="store_true")
    return ap.parse_args(argv)


def build(args: argparse.Namespace) -> dict:
    import torch

    import circuitsae
    from circuitsae.data import corpora
    from circuitsae.training.evaluate import fidelity
    from circuitsae.training.trainer import train

    torch.set_num_threads(torch.get_num_threads())
    out = ROOT / args.work / args.model
    model = circuitsae.load_model(args.model, device=args.device)
    t0 = time.perf_counter()
    saved = train(
        model=model,
        sites=tuple(args.sites),
        arch=("topk",),
        coefficients=(args.k,),
        expansion=args.expansion,
        batch_size=args.batch_size,
        lr=args.lr,
        tokens=args.tokens,
        buffer_rows=args.buffer_rows,
        chunk_contexts=args.chunk_contexts,
        model_batch=args.model_batch,
        eval_rows=args.eval_rows,
        checkpoint_every=args.checkpoint_every,
        out=str(out),
        device=args.device,
    )
    train_seconds = time.perf_counter() - t0
    if not saved:
        raise SystemExit("training stopped early; re-run the same command to continue")
    summary = json.loads((out / "train.json").read_text())
    first = next(iter(saved.values()))
    ids = corpora.contexts(
        model.tokenizer, args.contexts, 128, first.meta["stream"]["corpus"], "heldout", first.meta["stream"]["seed"]
    )
    t1 = time.perf_counter()
    pairs = [(sae.meta["site"], sae) for sae in saved.values()]
    fid = fidelity(model, pairs, ids, batch_size=args.contexts)
    fidelity_seconds = time.perf_counter() - t1
    rows = []
    for (name, sae), f in zip(saved.items(), fid):
        m = sae.meta["metrics"]
        kind, layer = sae.meta["site"].split(".")
        rows.append(
            {
                "site": sae.meta["site"],
                "kind": kind,
                "layer": int(layer),
                "d_sae": sae.d_dict,
                "l0": m["l0"],
                "fvu": m["fvu"],
                "gamma": m.get("gamma"),
                "dead_fraction": m["dead_fraction"],
                "loss_recovered": f["loss_recovered"],
                "delta_ce": f["delta_ce"],
                "ce_clean": f["ce_clean"],
                "ce_zero": f["ce_zero"],
                "kl": f["kl"],
                "input_scale": sae.meta["input_scale"],
                "folder": repo_path(out / name),
            }
        )
    return {
        "benchmark": "every_layer",
        "command": "python benchmarks/every_layer.py " + " ".join(sys.argv[1:]),
        "machine": describe(),
        "model": args.model,
        "settings": {
            "arch": "topk",
            "k": args.k,
            "expansion": args.expansion,
            "d_sae": first.d_dict,
            "tokens_per_site": args.tokens,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "buffer_rows": args.buffer_rows,
            "chunk_contexts": args.chunk_contexts,
            "model_batch": args.model_batch,
            "eval_rows": args.eval_rows,
            "loss_recovered_contexts": args.contexts,
            "loss_recovered_tokens": fid[0]["tokens"],
            "stream": first.meta["stream"],
        },
        "sites": len(rows),
        "train_seconds": train_seconds,
        "train_seconds_last_session": summary["seconds_last_session"],
        "tokens_per_second_last_session": summary["activations_per_second"],
        "fidelity_seconds": fidelity_seconds,
        "summary": {
            kind: {
                key: sum(r[key] for r in rows if r["kind"] == kind) / max(1, sum(r["kind"] == kind for r in rows))
                for key in ("fvu", "loss_recovered", "dead_fraction")
            }
            for kind in KIND_COLOURS
        },
        "rows": rows,
    }


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = sorted(RESULTS.glob("every_layer-*.json"))
    if not found:
        raise SystemExit("no benchmarks/results/every_layer-*.json to plot")
    panels = (("fvu", "FVU (held-out)"), ("l0", "L0"), ("loss_recovered", "loss recovered"),
              ("dead_fraction", "dead fraction"))  # fmt: skip
    fig, axes = plt.subplots(len(found), 4, figsize=(17, 4.2 * len(found)), squeeze=False)
    captions = []
    for row, f in zip(axes, found):
        data = json.loads(f.read_text())
        s = data["settings"]
        for ax, (key, label) in zip(row, panels):
            for kind, colour in KIND_COLOURS.items():
                pts = sorted((r["layer"], r[key]) for r in data["rows"] if r["kind"] == kind)
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, color=colour, label=kind)
            ax.set_xlabel("layer")
            ax.set_title(f"{data['model']}: {label}", fontsize=10)
            ax.grid(alpha=0.3)
            if key == "loss_recovered":
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            if key == "l0":  # every TopK row keeps k units (fewer only where a kept pre-activation is <= 0)
                ax.set_ylim(0, 1.25 * s["k"])
                ax.ticklabel_format(axis="y", useOffset=False)
        row[0].legend(fontsize=8)
        captions.append(
            f"{data['model']}: TopK k={s['k']}, {s['d_sae']} latents, {s['tokens_per_site'] / 1e3:.0f}k tokens per "
            f"site; {data['sites']} sites trained in one pass from the model in {data['train_seconds'] / 60:.0f} min "
            f"on {data['machine']['cpu']} ({data['machine']['cores']} cores); loss recovered on "
            f"{s['loss_recovered_tokens']} held-out tokens (noisy where zero-ablating the site barely moves the loss)"
        )
    fig.tight_layout(h_pad=4.0, rect=(0, 0.05 / len(found), 1, 1))
    for row, caption in zip(axes, captions):
        fig.text(0.01, row[0].get_position().y0 - 0.14 / len(found), caption, fontsize=8, va="top")
    fig.savefig(path, dpi=110)
    print(f"wrote {repo_path(path)}")


def main() -> None:
    args = parse_args()
    if not args.plot_only:
        result = build(args)
        path = RESULTS / f"every_layer-{args.model}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {repo_path(path)}")
        for kind, v in result["summary"].items():
            print(
                f"{kind}: mean FVU {v['fvu']:.3f}, loss recovered {v['loss_recovered']:.3f}, dead {v['dead_fraction']:.3f}"
            )
    plot(RESULTS / "every_layer.png")


if __name__ == "__main__":
    main()
