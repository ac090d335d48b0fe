"""Cunningham et al. Fig. 3 / Fig. 17 on SmolLM2: IOI feature patching with ACDC ordering.

At each residual site: the baseline SAE at two sparsity coefficients, the
Gated SAE, the α = 0 dictionary (all of width 2·d) and PCA (a rotation, all
components), on the same 50 IOI prompts. For each, ACDC orders the features
(thresholds logspace(−5, 0, 50)) and, beside it, attribution; the curves are
KL(patched ‖ target) vs features patched and vs edit magnitude.

    python benchmarks/kl_vs_patches.py                      # harvest + train if needed, then all sites
    python benchmarks/kl_vs_patches.py --sites resid.16     # the Fig. 3 analogue only

Per-site results are kept in ``--work`` so an interrupted run resumes at the
next site. Also measures, in the same run, the speed of :func:`acdc` against
the sequential reference (one full forward per visit) on a reduced problem
both can finish, and checks they give the same output.

Writes ``benchmarks/results/kl_vs_patches.json`` + ``.png`` (the main site) and
``kl_vs_patches_layers.png`` (every site, like Fig. 17).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

import circuitsae  # noqa: E402
from circuitsae.acdc import acdc, acdc_reference  # noqa: E402
from circuitsae.ioi_curves import halving, plot_curves, run_ioi  # noqa: E402
from circuitsae.tasks import make_ioi  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def prepare(args: argparse.Namespace) -> None:
    """Harvest and train the dictionaries unless they exist (both resume if interrupted)."""
    work = Path(args.work)
    sites = args.sites
    if not all((work / "saes" / f"{s}-relu-c{c:g}").exists() for s in sites for c in (0, *args.coefficients)):
        circuitsae.harvest(circuitsae.HarvestConfig(sites=sites, tokens=args.tokens, out=str(work / "acts")))
        circuitsae.train(store=str(work / "acts"), out=str(work / "saes"), sites=sites, arch=("relu",),
                         coefficients=(0.0, *args.coefficients), expansion=2.0, lr=1e-3, batch_size=1024, epochs=2)  # fmt: skip
    if not all((work / "saes-gated" / f"{s}-gated-c{args.gated:g}").exists() for s in sites):
        circuitsae.train(store=str(work / "acts"), out=str(work / "saes-gated"), sites=sites, arch=("gated",),
                         coefficients=(args.gated,), gated_expansion=2.0, lr=1e-3, batch_size=1024, epochs=2)  # fmt: skip


def speedup(model, args: argparse.Namespace) -> dict:
    """acdc vs acdc_reference on the same reduced problem, one after the other in this process."""
    site = args.main_site
    d = circuitsae.load_dictionary(Path(args.work) / "saes" / f"{site}-relu-c{max(args.coefficients):g}")
    ds = make_ioi(model, n=args.speedup_prompts, seed=0)
    taus = np.logspace(-5, 0, args.speedup_thresholds)
    fast = acdc(model, d, site, ds, thresholds=taus, progress=False)
    ref = acdc_reference(model, d, site, ds, thresholds=taus, progress=True)
    same_sets = fast.removed_at == ref.removed_at
    kl_err = max(abs(a["kl"] - b["kl"]) for a, b in zip(fast.records, ref.records))
    return {
        "dictionary": f"{site}-relu-c{max(args.coefficients):g}",
        "prompts": args.speedup_prompts,
        "thresholds": args.speedup_thresholds,
        "candidates": fast.n_candidates,
        "acdc_seconds": fast.seconds,
        "reference_seconds": ref.seconds,
        "speedup": ref.seconds / fast.seconds,
        "acdc_evaluations": fast.evaluations,
        "reference_evaluations": ref.evaluations,
        "same_removals": same_sets,
        "same_order": fast.order == ref.order,
        "differing_decisions": sorted(
            f for f in set(fast.removed_at) | set(ref.removed_at) if fast.removed_at.get(f) != ref.removed_at.get(f)
        ),
        "max_abs_kl_difference": kl_err,
        "n_features": [r["n_features"] for r in fast.records],
        "reference_n_features": [r["n_features"] for r in ref.records],
    }


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` writes what is finished
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", nargs="+", default=["resid.24", "resid.16", "resid.8"], help="main site first")
    ap.add_argument("--main-site", default="resid.24", help="the site of the Fig. 3 analogue")
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--coefficients", type=float, nargs="+", default=[1.0, 4.0], help="baseline α (α = 0 is added)")
    ap.add_argument("--gated", type=float, default=2.0, help="Gated SAE λ")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--thresholds", type=int, default=50, help="ACDC thresholds, log-spaced over [1e-5, 1]")
    ap.add_argument("--attribution-only", action="store_true", help="no exact ACDC anywhere (minutes on a CPU)")
    ap.add_argument("--dense-acdc", action="store_true", help="exact ACDC also for α = 0 and PCA (hours on a CPU)")
    ap.add_argument("--layer-prompts", type=int, default=None, help="prompts at the other sites (default: --prompts)")
    ap.add_argument(
        "--layer-orders",
        choices=["both", "attribution"],
        default="both",
        help="orderings at the other sites (attribution only: minutes instead of hours on a CPU)",
    )
    ap.add_argument("--speedup-prompts", type=int, default=10)
    ap.add_argument("--speedup-thresholds", type=int, default=10)
    ap.add_argument("--no-speedup", action="store_true")
    ap.add_argument("--work", default="runs/ioi")
    ap.add_argument("--results-name", default="kl_vs_patches", help="stem of the files in benchmarks/results")
    args = ap.parse_args()
    prepare(args)
    work = Path(args.work)
    model = circuitsae.load_model("smollm2-135m", device="cpu")
    out = {"machine": describe(), "main_site": args.main_site, "prompts": args.prompts}
    if not args.no_speedup:  # first, on an idle machine, before the long part
        sp = work / "speedup.json"
        if not sp.exists():
            t0 = time.perf_counter()
            res = speedup(model, args)
            res["wall_seconds"] = time.perf_counter() - t0
            sp.write_text(json.dumps(res, indent=1))
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "kl_vs_patches_speedup.json").write_text(json.dumps({**res, "machine": describe()}, indent=1))
        out["speedup"] = json.loads(sp.read_text())
        print(json.dumps({k: v for k, v in out["speedup"].items() if "n_features" not in k}, indent=1))
    reports = {}
    for site in args.sites:  # results are written after every site, so a partial run is usable
        main_site = site == args.main_site
        prompts = args.prompts if main_site else (args.layer_prompts or args.prompts)
        acdc_here = not args.attribution_only and (main_site or args.layer_orders == "both")
        tag = f"{prompts}p{args.thresholds}t{'' if acdc_here else '-attribution'}{'-dense' if args.dense_acdc else ''}"
        part = work / f"curves-{site}-{tag}" / "kl_vs_patches.json"
        if not part.exists() or not json.loads(part.read_text()).get("complete", True):
            dicts = sorted(str(p) for p in (work / "saes").glob(f"{site}-*")) + sorted(
                str(p) for p in (work / "saes-gated").glob(f"{site}-*")
            )
            try:
                run_ioi(dictionaries=dicts, model=model, prompts=prompts, thresholds=args.thresholds, acdc=acdc_here,
                        acdc_dense=args.dense_acdc, out=str(part.parent))  # fmt: skip
            finally:  # also on Ctrl-C / SIGTERM: the curves finished so far are written
                if part.exists():
                    reports[site] = json.loads(part.read_text())
                    write(out, reports, args)
        reports[site] = json.loads(part.read_text())
        write(out, reports, args)


def write(out: dict, reports: dict, args: argparse.Namespace) -> None:
    main = reports.get(args.main_site) or next(iter(reports.values()))
    out = {
        **out,
        "model": main["model"],
        "ioi": main["ioi"],
        "sites": list(reports),
        "seconds_by_site": {s: r["seconds"] for s, r in reports.items()},
        "prompts_by_site": {s: r["prompts"] for s, r in reports.items()},
        "results": [r for rep in reports.values() for r in rep["results"]],
    }
    # features and edit each ordering needs to halve the unpatched KL (the README's table)
    out["halving"] = [halving(r) for r in out["results"]]
    RESULTS.mkdir(exist_ok=True)
    name = args.results_name
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1))
    plot_curves(main, RESULTS / f"{name}.png")
    layers = sorted(reports, key=lambda s: int(s.split(".")[1]))
    if len(layers) > 1:
        plot_curves({**main, "results": out["results"]}, RESULTS / f"{name}_layers.png", sites=layers)
    print(f"wrote {RESULTS / name}.json with sites {layers}")


if __name__ == "__main__":
    main()
