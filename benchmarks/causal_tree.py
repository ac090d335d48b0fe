"""Cunningham et al. Fig. 4/5 on SmolLM2: a token feature, its analysis and its causal tree, timed.

Uses baseline SAEs at four successive residual sites (by default the ones
``make demo`` trains in ``runs/demo``; pass ``--work`` and ``--sites`` for
others), picks the feature at the last site that best picks out one of the
paper's example tokens, analyses it (histogram, logit effect) and builds its
depth-3, branching-3 tree over 20 contexts — in both modes, one after the
other in this process: ``paper`` (the default: each parent on its own
contexts, Cunningham et al. §5.3) and ``shared`` (the root's contexts at every
level).

    python benchmarks/causal_tree.py                  # after `make demo`
    python benchmarks/causal_tree.py --work runs/demo-bench   # the demo benchmark's run

Writes ``benchmarks/results/causal_tree.{svg,png,dot,json}`` (paper mode),
``causal_tree_shared.*`` (shared mode), the feature's
``causal_tree_feature-histogram.png`` / ``-logit_effect.png`` and
``causal_tree_timing.json`` (wall times of both modes, machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import ROOT, describe, repo_path  # noqa: E402

import circuitsae  # noqa: E402
from circuitsae.circuits.features import analyse_feature, find_token_feature  # noqa: E402
from circuitsae.circuits.trees import causal_tree  # noqa: E402
from circuitsae.data.store import ActivationStore  # noqa: E402
from circuitsae.viz.plots import write_feature_report  # noqa: E402
from circuitsae.viz.render import render  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/demo", help="folder with activations/ and saes/ (a demo run)")
    ap.add_argument("--sites", nargs="+", default=["resid.24", "resid.25", "resid.26", "resid.27"])
    ap.add_argument("--coefficient", default="1", help="baseline α of the SAEs used")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--branching", type=int, default=3)
    ap.add_argument("--contexts", type=int, default=20)
    args = ap.parse_args()
    work = Path(args.work)
    model = circuitsae.load_model("smollm2-135m", device="cpu")
    dicts = {s: circuitsae.load_dictionary(work / "saes" / f"{s}-relu-c{args.coefficient}") for s in args.sites}
    store = ActivationStore(work / "activations")
    site = args.sites[-1]
    t0 = time.perf_counter()
    pick = find_token_feature(dicts[site], store, site, model.tokenizer)
    report = analyse_feature(model, dicts[site], store, pick["feature"], site)
    t_feature = time.perf_counter() - t0
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # the report's own folder is not a result: its two plots are
        paths = write_feature_report(report, Path(tmp) / "causal_tree_feature")
        for kind in ("histogram", "logit_effect"):
            shutil.copy(paths[kind], RESULTS / f"causal_tree_feature-{kind}.png")
    print(report.summary())
    timing = {
        "machine": describe(),
        "work": str(work),
        "target": f"{site}:{pick['feature']}",
        "token": pick["token"],
        "precision": pick["precision"],
        "recall": pick["recall"],
        "depth": args.depth,
        "branching": args.branching,
        "feature_seconds": t_feature,
        "modes": {},
    }
    for mode, stem in (("paper", "causal_tree"), ("shared", "causal_tree_shared")):
        t0 = time.perf_counter()
        tree = causal_tree(model, dicts, (site, pick["feature"]), depth=args.depth, branching=args.branching,
                           contexts=args.contexts, mode=mode)  # fmt: skip
        t_tree = time.perf_counter() - t0
        tree.extra["machine"] = describe()
        files = {k: repo_path(v) for k, v in render(tree, RESULTS / stem).items()}
        timing["modes"][mode] = {
            "tree_seconds": t_tree,
            "contexts": tree.contexts,
            "nodes": tree.number_of_nodes(),
            "edges": tree.number_of_edges(),
            "engines": tree.engines,
            "edges_by_effect": sorted(
                ({"from": u, "to": v, **e} for u, v, e in tree.edges(data=True)), key=lambda e: -e["effect"]
            ),
            "files": files,
        }
        print(f"{mode}: {t_tree:.1f} s, {tree.number_of_nodes()} nodes")
    (RESULTS / "causal_tree_timing.json").write_text(json.dumps(timing, indent=1, default=str))
    brief = {m: {k: v for k, v in r.items() if k != "edges_by_effect"} for m, r in timing["modes"].items()}
    print(json.dumps({**timing, "modes": brief}, indent=1, default=str))


if __name__ == "__main__":
    main()
