"""The whole-model IOI feature circuit on a real model, its estimator error against exact patching, faithfulness
curves against neurons and PCA, the error nodes' share by layer, and the time of each stage.

    python benchmarks/feature_circuit.py                          # SmolLM2-135M, all 90 sites
    python benchmarks/feature_circuit.py --model gemma3-270m --bases sae

The dictionaries are the full-stack TopK sets of ``benchmarks/every_layer.py`` (kept out of git; that benchmark's
command rebuilds them into ``runs/bench/every_layer/<model>``). The prompts are IOI pairs split as in
:func:`circuitsae.circuits.curves.split_prompts`: ``--prompts`` selection pairs on the even-numbered templates and
names, ``--heldout-prompts`` on the odd-numbered ones (another seed), so no template and no name is shared.

Stages, each timed (one process, this CPU, float32):

1. **AtP**: one recording run of the target and base prompts with one backward pass (every node's attribution),
   then edges (∇_d m · ∂d/∂u · Δu) among the top ``--max-nodes`` nodes;
2. **IG**: node effects by integrated gradients (``--steps``), each site's path run through the blocks after it
   only, and the same edges among the IG circuit's nodes — this is the circuit drawn;
3. **check**: exact effects of the circuit's nodes plus ``--check-nodes`` others drawn equally from five bands of
   |estimate|, and of ``--check-edges`` edges (the strongest half first), compared with AtP and IG;
4. **faithfulness** F(n) and completeness of the top-n nodes (mean ablation over the target prompts), for the
   SAEs with and without error nodes, on the selection and the held-out prompts, and (``--bases``) for the neuron
   basis (:class:`~circuitsae.dictionaries.IdentityDictionary`) and PCA at every site, ordered by the same
   estimator (``--base-order``, AtP by default; the SAE curves are drawn in both orders);
5. the share of each site's whole IG effect carried by its error node.

Writes ``benchmarks/results/feature_circuit-<model>.json`` (the machine named), ``feature_circuit-<model>.png``
(faithfulness, completeness, error share, estimate vs exact) and the circuit's drawing
``feature_circuit-<model>.svg``/``.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe, repo_path  # noqa: E402

from circuitsae import sites as sites_mod  # noqa: E402
from circuitsae.circuits import effects as E  # noqa: E402
from circuitsae.circuits.circuit import faithfulness, feature_circuit  # noqa: E402
from circuitsae.circuits.curves import split_prompts  # noqa: E402
from circuitsae.circuits.estimator_error import check_circuit  # noqa: E402
from circuitsae.data.corpora import contexts  # noqa: E402
from circuitsae.dictionaries import IdentityDictionary, PCADictionary  # noqa: E402
from circuitsae.dictionaries.folders import select_dictionaries  # noqa: E402
from circuitsae.models import load_model  # noqa: E402
from circuitsae.viz.circuit import render  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SIZES = (1, 4, 16, 64, 256, 1024, 4096)


def parse_args(argv: "list[str] | None" = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dictionaries", default=None, help="default: runs/bench/every_layer/<model>")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--heldout-prompts", type=int, default=50)
    ap.add_argument("--steps", type=int, default=10, help="integrated-gradient steps")
    ap.add_argument("--max-nodes", type=int, default=60)
    ap.add_argument("--check-nodes", type=int, default=300)
    ap.add_argument("--check-edges", type=int, default=200)
    ap.add_argument("--bases", nargs="+", default=["sae", "neurons", "pca"], choices=("sae", "neurons", "pca"))
    ap.add_argument(
        "--base-order",
        default="atp",
        choices=E.METHODS,
        help="estimator ordering the neuron and PCA nodes (the SAE curves are drawn for both)",
    )
    ap.add_argument("--pca-contexts", type=int, default=64, help="corpus contexts of 128 tokens PCA is fitted on")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=None, help="default: runs/bench/feature_circuit/<model>")
    ap.add_argument("--plot-only", action="store_true", help="redraw the figure from the JSON")
    return ap.parse_args(argv)


def fit_pca(model, site_names, n_contexts: int) -> dict:
    """A PCA dictionary at every site, fitted on ``n_contexts`` corpus contexts (the start token left out)."""
    ids = contexts(model.tokenizer, n_contexts, 128, split="train", seed=0)
    acts: dict[str, list] = {s: [] for s in site_names}
    for i in range(0, len(ids), 8):
        saved = {}
        with torch.no_grad(), model.trace(ids[i : i + 8]):
            for s in site_names:
                saved[s] = sites_mod.read(model, s).save()
        for s in site_names:
            acts[s].append(saved[s][:, 1:].reshape(-1, saved[s].shape[-1]).float())
    out = {}
    for s in site_names:
        d = PCADictionary.fit(torch.cat(acts[s]))
        d.meta = {"site": s, "first_position": 1}
        out[s] = d
    return out


def curve_json(f) -> dict:
    return {**f.to_json(), "nodes_for_0.8": f.nodes_for(0.8), "nodes_for_0.5": f.nodes_for(0.5)}


def build(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    folder = Path(args.dictionaries or f"runs/bench/every_layer/{args.model}")
    out = Path(args.out or f"runs/bench/feature_circuit/{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, dtype="float32")
    dicts = select_dictionaries([str(folder)])
    order = [str(s) for s in sites_mod.resolve(model, list(dicts))]
    print(f"{len(order)} sites with dictionaries from {repo_path(folder)}")
    select, held = split_prompts(model, args.prompts, args.heldout_prompts, seed=0)
    seconds: dict[str, float] = {}
    bs = args.batch_size

    # 1. attribution patching: nodes (one recording run with one backward pass) and edges
    atp_circuit, atp, acts = feature_circuit(model, dicts, select, method="atp", max_nodes=args.max_nodes,
                                             batch_size=bs, progress=True)  # fmt: skip
    seconds["atp_nodes"], seconds["atp_edges"] = atp_circuit.seconds["nodes"], atp_circuit.seconds["edges"]
    # 2. integrated gradients: nodes (record again: the command's path) and edges among its circuit's nodes
    circuit, ig, acts = feature_circuit(model, dicts, select, method="ig", steps=args.steps,
                                        max_nodes=args.max_nodes, batch_size=bs, progress=True)  # fmt: skip
    seconds["ig_nodes"], seconds["ig_edges"] = circuit.seconds["nodes"], circuit.seconds["edges"]
    print(f"nodes: AtP {seconds['atp_nodes']:.0f} s, IG {seconds['ig_nodes']:.0f} s; "
          f"edges {seconds['ig_edges']:.0f} s ({circuit.number_of_edges()} edges)")  # fmt: skip
    # 3. the exact check
    check = check_circuit(circuit, model, dicts, select, {"atp": atp, "ig": ig}, acts, n_nodes=args.check_nodes,
                          n_edges=args.check_edges, batch_size=bs, progress=True)  # fmt: skip
    seconds["check_nodes"], seconds["check_edges"] = check.seconds["nodes"], check.seconds["edges"]
    circuit.seconds = dict(seconds)
    (out / "circuit.json").write_text(json.dumps(circuit.to_json(), indent=1))
    drawn = render(circuit, out / "circuit", max_nodes=args.max_nodes)
    for ext in ("svg", "png"):
        if f"{ext}" in drawn:
            shutil.copy(drawn[ext], RESULTS / f"feature_circuit-{args.model}.{ext}")
    # 5. error share by site
    share = []
    for s, (feat, err) in ig.site_totals().items():
        p = sites_mod.Site.parse(s)
        share.append({"site": s, "kind": p.kind, "layer": p.layer, "features": feat, "error": err,
                      "error_share": abs(err) / (abs(feat) + abs(err)) if abs(feat) + abs(err) > 0 else None})  # fmt: skip
    # 4. faithfulness and completeness
    t0 = time.perf_counter()
    estimates = {"atp": atp, "ig": ig}
    curves: dict[str, dict] = {}
    _, held_acts = E.node_effects(model, dicts, held, method="atp", batch_size=bs)

    def add(label: str, dd: dict, scores: dict, pairs, pa, errors: bool = True) -> None:
        tc = time.perf_counter()
        f = faithfulness(model, dd, pairs, scores, pa, sizes=SIZES, errors=errors, batch_size=bs)
        curves[label] = {**curve_json(f), "seconds": time.perf_counter() - tc}
        print(f"faithfulness {label}: " + ", ".join(f"{n}:{x:.2f}" for n, x in zip(f.n, f.faithfulness)))

    if "sae" in args.bases:
        ig_scores = ig.node_scores()
        add("SAE + error nodes, selection (IG order)", dicts, ig_scores, select, acts)
        add("SAE, no error nodes, selection (IG order)", dicts, ig_scores, select, acts, errors=False)
        add("SAE + error nodes, held-out (IG order)", dicts, ig_scores, held, held_acts)
        if args.base_order != "ig":
            add(f"SAE + error nodes, selection ({args.base_order} order)", dicts,
                estimates[args.base_order].node_scores(), select, acts)  # fmt: skip
    for base in [b for b in args.bases if b != "sae"]:
        tb = time.perf_counter()
        if base == "neurons":
            bd = {s: IdentityDictionary(sites_mod.d_model(model)) for s in order}
            for s, d in bd.items():
                d.meta = {"site": s, "first_position": 1}
        else:
            bd = fit_pca(model, order, args.pca_contexts)
        eff, bacts = E.node_effects(model, bd, select, method=args.base_order, steps=args.steps, batch_size=bs,
                                    progress=True)  # fmt: skip
        seconds[f"{base}_nodes"] = time.perf_counter() - tb
        name = "neurons" if base == "neurons" else "PCA"
        add(f"{name}, selection ({args.base_order} order)", bd, eff.node_scores(), select, bacts)
    seconds["faithfulness"] = time.perf_counter() - t0
    return {
        "benchmark": "feature_circuit",
        "machine": describe(),
        "command": "python benchmarks/feature_circuit.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "dictionaries": repo_path(folder),
        "sites": len(order),
        "prompts": len(select),
        "heldout_prompts": len(held),
        "steps": args.steps,
        "max_nodes": args.max_nodes,
        "base_order": args.base_order,
        "base_metric": float(acts.base_metric.mean()),
        "seconds": seconds,
        "circuit": {
            "nodes": circuit.number_of_nodes() - 1,
            "edges": circuit.number_of_edges(),
            "error_nodes": sum(1 for v in circuit.graph if circuit.nodes[v].get("error")),
            "top": [
                {"node": v, "effect": circuit.nodes[v]["effect"], "exact": circuit.nodes[v].get("exact")}
                for v in sorted(
                    (v for v in circuit.graph if v != "logits"), key=lambda v: -abs(circuit.nodes[v]["effect"])
                )[:20]
            ],
        },  # fmt: skip
        "estimator_error": check.to_json(),
        "error_share": share,
        "faithfulness": curves,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(22, 5))
    for label, c in result["faithfulness"].items():
        style = "-" if "SAE" in label else ("--" if "neurons" in label else ":")
        ax[0].plot(c["n"], c["faithfulness"], style, marker="o", ms=3, label=label)
        ax[1].plot(c["n"], c["completeness"], style, marker="o", ms=3, label=label)
    for a, what in zip(ax[:2], ("faithfulness F(C)", "completeness: F of the model with C ablated")):
        a.set_xscale("log", base=2)
        a.axhline(1, color="grey", lw=0.5)
        a.axhline(0, color="grey", lw=0.5)
        a.set_xlabel("nodes kept (top n by |estimated effect|)")
        a.set_ylabel(what)
        a.legend(fontsize=7)
    for kind, colour in (("resid", "C0"), ("attn", "C1"), ("mlp", "C2")):
        rows = sorted((r for r in result["error_share"] if r["kind"] == kind), key=lambda r: r["layer"])
        ax[2].plot([r["layer"] for r in rows], [r["error_share"] for r in rows], marker="o", ms=3, color=colour,
                   label=kind)  # fmt: skip
    ax[2].set_xlabel("layer")
    ax[2].set_ylabel("|error node| / (|features| + |error node|), IG")
    ax[2].set_ylim(0, 1)
    ax[2].legend(fontsize=8)
    checked = result["estimator_error"]["checked_nodes"]
    for method, marker in (("atp", "x"), ("ig", "o")):
        ax[3].scatter([r["exact"] for r in checked], [r[method] for r in checked], s=8, marker=marker,
                      label=method, alpha=0.7)  # fmt: skip
    lim = max(abs(r[k]) for r in checked for k in ("exact", "atp", "ig")) * 1.05
    ax[3].plot([-lim, lim], [-lim, lim], color="grey", lw=0.5)
    ax[3].set_xlabel("exact effect of patching the node alone")
    ax[3].set_ylabel("estimate")
    ax[3].set_xscale("symlog", linthresh=1e-3)
    ax[3].set_yscale("symlog", linthresh=1e-3)
    ax[3].legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"{result['model']} IOI feature circuit: {result['sites']} sites, {result['prompts']} + "
                 f"{result['heldout_prompts']} prompts ({m['cpu']}, {m['cores']} cores)", fontsize=11)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    path = RESULTS / f"feature_circuit-{args.model}.json"
    if not args.plot_only:
        result = build(args)
        path.write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
        print(f"wrote {repo_path(path)}")
    result = json.loads(path.read_text())
    plot(result, RESULTS / f"feature_circuit-{args.model}.png")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()))
    for method, by in result["estimator_error"]["nodes"].items():
        s = by["all"]
        print(f"{method}: Spearman {s['spearman']:.2f}, median rel. error {s['median_relative_error']:.2f}, "
              f"sign {s['sign_agreement']:.2f}, false negatives {s['false_negative_rate']}")  # fmt: skip


if __name__ == "__main__":
    main()
