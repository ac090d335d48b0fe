"""Reproduce the Gated-SAE paper's headline on SmolLM2: the (L0, loss recovered) frontier and γ.

One residual site of SmolLM2-135M; the baseline ReLU SAE (untied, learned
b_dec — the baseline the Gated paper compares against) and the Gated SAE,
each over the same sparsity coefficients, trained together in ONE pass over
the store; gated width = 3/4 of the baseline's, as the paper does for equal
compute. Every SAE is then evaluated on held-out text: L0, FVU, γ, and loss
recovered with it spliced into the model.

The later architectures (REFERENCE §2b) on the same tokens, steps, learning
rate and the baseline's width, in one more pass: TopK and BatchTopK over a
grid of k, JumpReLU over a grid of λ (``--later-arch none`` leaves them out).

The paper expects: gated Pareto-better (higher loss recovered at equal L0),
γ ≈ 1 for gated and γ < 1 (shrinkage) for the baseline.

    python benchmarks/pareto.py                 # 2 CPU cores: ~19 min after the harvest, ~20 min more for the later
                                                # architectures (wall times in the JSON)
    python benchmarks/pareto.py --tokens 20000000 --expansion 16 --batch-size 4096 --contexts 512   # GPU scale

Harvest, training and evaluation all resume if interrupted. Writes
``benchmarks/results/pareto.json`` and ``pareto.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

import circuitsae  # noqa: E402
from circuitsae.training.evaluate import evaluate  # noqa: E402
from circuitsae.training.trainer import train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLORS = {
    "relu": "tab:blue",
    "gated": "tab:orange",
    "topk": "tab:green",
    "batchtopk": "tab:red",
    "jumprelu": "tab:purple",
}
LABELS = {
    "relu": "baseline ReLU SAE (L1)",
    "gated": "Gated SAE",
    "topk": "TopK SAE",
    "batchtopk": "BatchTopK SAE",
    "jumprelu": "JumpReLU SAE",
}
LATER = ("topk", "batchtopk", "jumprelu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--site", default="resid.6")
    ap.add_argument("--tokens", type=int, default=1_000_000, help="training activations harvested")
    ap.add_argument("--coefficients", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    ap.add_argument("--expansion", type=float, default=4.0, help="baseline width / d (gated gets 3/4 of it)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3, help="same for both architectures")
    ap.add_argument("--contexts", type=int, default=64, help="held-out contexts for loss recovered")
    ap.add_argument("--work", default="runs/bench/pareto", help="folder for activations and SAEs")
    ap.add_argument("--device", default=None)
    ap.add_argument("--gated-ratio", type=float, default=0.75, help="gated width / baseline width (paper: 3/4)")
    ap.add_argument("--tag", default="", help="suffix for the work folder and result files (e.g. equal-width)")
    ap.add_argument("--later-arch", nargs="+", default=list(LATER), help="later architectures, or none")
    ap.add_argument("--k", type=int, nargs="+", default=[8, 16, 32, 64, 128], help="k of the TopK/BatchTopK runs")
    ap.add_argument("--jumprelu-coefficients", type=float, nargs="+", default=[0.1, 0.3, 1, 3, 10])
    args = ap.parse_args()
    suffix = f"-{args.tag}" if args.tag else ""

    work = Path(args.work + suffix)
    times = {}
    t = time.perf_counter()
    store = circuitsae.harvest(sites=[args.site], tokens=args.tokens, out=str(Path(args.work).parent / "pareto-acts"))
    times["harvest_s"] = time.perf_counter() - t
    t = time.perf_counter()
    # the same tokens, steps, learning rate and (baseline) width for every architecture
    common = dict(store=str(store.root), expansion=args.expansion, lr=args.lr, batch_size=args.batch_size,
                  epochs=args.epochs, device=args.device)  # fmt: skip
    train(
        out=str(work),
        arch=("relu", "gated"),
        coefficients=tuple(args.coefficients),
        gated_expansion=args.expansion * args.gated_ratio,
        tied=False,
        decoder_bias=True,
        **common,
    )
    times["train_s"] = time.perf_counter() - t
    later = tuple(a for a in args.later_arch if a != "none")
    folders = [str(work)]
    if later:
        t = time.perf_counter()
        per_arch = tuple(f"{a}={','.join(str(k) for k in args.k)}" for a in later if a in ("topk", "batchtopk"))
        if "jumprelu" in later:
            per_arch += (f"jumprelu={','.join(f'{c:g}' for c in args.jumprelu_coefficients)}",)
        train(out=str(work) + "-later", arch=later, arch_coefficients=per_arch, **common)
        times["train_later_s"] = time.perf_counter() - t
        folders.append(str(work) + "-later")
    t = time.perf_counter()
    report = evaluate(
        dictionaries=tuple(folders), contexts=args.contexts, out=str(work) + "-eval.json", device=args.device
    )
    times["eval_s"] = time.perf_counter() - t

    runs = []
    for name, r in report.results.items():
        runs.append(
            {
                k: getattr(r, k)
                for k in (
                    "architecture",
                    "coefficient",
                    "d_dict",
                    "l0",
                    "fvu",
                    "gamma",
                    "loss_recovered",
                    "delta_ce",
                    "kl",
                    "dead_fraction",
                    "dense_fraction",
                )
            }
            | {"name": name}
        )
    runs.sort(key=lambda r: (r["architecture"], r["coefficient"]))
    verdict = compare(runs)
    train_log = json.loads((work / "train.json").read_text())
    out = {
        "machine": describe(),
        "model": report["model"],
        "site": args.site,
        "store": {
            "train_tokens": store.n_rows("train"),
            "heldout_tokens": store.n_rows("heldout"),
            "corpus": store.config["corpus"],
        },
        "settings": vars(args) | {"gated_expansion": args.expansion * args.gated_ratio},
        "wall_seconds": times,
        "train_activations_per_second_all_runs": train_log.get("activations_per_second"),
        "later_architectures": later_summary(runs) if later else None,
        "runs": runs,
        "verdict": verdict,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"pareto{suffix}.json").write_text(json.dumps(out, indent=1))
    plot(runs, args, RESULTS / f"pareto{suffix}.png", report["model"])
    print(json.dumps(verdict, indent=1))
    print(f"wrote {RESULTS / f'pareto{suffix}.json'} and .png")


def _interp(l0: float, pts: list[tuple[float, float]]) -> "float | None":
    """Loss recovered of a frontier (sorted by L0) at ``l0`` by linear interpolation in log L0."""
    import math

    pts = sorted(pts)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= l0 <= x1 and x1 > x0:
            w = (math.log(l0) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + w * (y1 - y0)
    return None


def compare(runs: list[dict]) -> dict:
    """Where the frontiers overlap in L0, gated minus baseline loss recovered at the gated runs' L0."""
    pts = {
        a: [(r["l0"], r["loss_recovered"]) for r in runs if r["architecture"] == a and r["l0"] > 0]
        for a in ("relu", "gated")
    }
    diffs = []
    for l0, lr in pts["gated"]:
        base = _interp(l0, pts["relu"])
        if base is not None:
            diffs.append({"l0": l0, "gated": lr, "relu_interpolated": base, "gated_minus_relu": lr - base})
    gam = {a: [r["gamma"] for r in runs if r["architecture"] == a] for a in ("relu", "gated")}
    return {
        "overlap_points": diffs,
        "gated_pareto_better_at_all_overlap_points": bool(diffs) and all(d["gated_minus_relu"] > 0 for d in diffs),
        "gamma_relu": gam["relu"],
        "gamma_gated": gam["gated"],
        "relu_shrinks (all gamma<1)": all(g < 1 for g in gam["relu"]),
        "gated_gamma_within_0.05_of_1": all(abs(g - 1) < 0.05 for g in gam["gated"]),
    }


def later_summary(runs: list[dict]) -> dict:
    """For each architecture, its loss recovered minus the baseline's (interpolated) at the same L0."""
    pts = {a: [(r["l0"], r["loss_recovered"]) for r in runs if r["architecture"] == a and r["l0"] > 0] for a in COLORS}
    out = {}
    for arch in ("gated", *LATER):
        rows = []
        for l0, lr in sorted(pts[arch]):
            base = _interp(l0, pts["relu"])
            rows.append({"l0": l0, "loss_recovered": lr, "minus_relu": None if base is None else lr - base})
        out[arch] = rows
    return out


def plot(runs: list[dict], args: argparse.Namespace, path: Path, model: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for arch in COLORS:
        rs = sorted((r for r in runs if r["architecture"] == arch), key=lambda r: r["l0"])
        if not rs:
            continue
        l0 = [r["l0"] for r in rs]
        kw = {"color": COLORS[arch], "marker": "o", "label": f"{LABELS[arch]} (d_sae={rs[0]['d_dict']})"}
        axes[0].plot(l0, [1 - r["loss_recovered"] for r in rs], **kw)
        axes[1].plot(l0, [r["fvu"] for r in rs], **kw)
        axes[2].plot(l0, [r["gamma"] for r in rs], **kw)
        for r in rs:
            axes[0].annotate(
                f"{'k=' if arch in ('topk', 'batchtopk') else ''}{r['coefficient']:g}",
                (r["l0"], 1 - r["loss_recovered"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
                color=COLORS[arch],
            )
    axes[0].set(
        xscale="log",
        xlabel="L0 (features active per token)",
        yscale="log",
        ylabel="1 − loss recovered",
        title="Pareto frontier (lower-left is better)",
    )
    axes[1].set(xscale="log", yscale="log", xlabel="L0", ylabel="FVU", title="fraction of variance unexplained")
    axes[2].axhline(1.0, color="gray", lw=1, ls="--")
    axes[2].set(
        xscale="log", xlabel="L0", ylabel="γ = E||x̂||² / E[x·x̂]", title="relative reconstruction bias (γ<1: shrinkage)"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=10, frameon=False)
    fig.suptitle(
        f"{model} {args.site}: SAE architectures, {args.tokens:,} training tokens (labels: α, λ or k)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
