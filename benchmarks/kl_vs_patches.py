"""Cunningham et al. Fig. 3 / Fig. 17 on SmolLM2: IOI feature patching with better SAEs.

The paper's 50 prompts but 20 thresholds by default (REFERENCE §4 and ``circuitsae ioi`` use 50): the
curves' records are up to 1.7× apart in features, so the counts in docs/ioi.md are read off between
records (interpolated on log n, :func:`circuitsae.circuits.curves.halving`).

At a late site (resid.27 of 30) and a middle one (resid.15, like the paper's
layer 11 of 24), SAEs trained on ``--tokens`` (2M) activations: the baseline
SAE at an α grid, the α = 0 dictionary, the Gated SAE, and PCA (a rotation,
all components). On ``--prompts`` (50) IOI prompts built from half of the
templates and names:

* attribution order for every dictionary at every site (``--sites``: four
  layers, the paper's Fig. 17);
* exact ACDC (``--thresholds``, ≥ 20) at the late site for the Gated SAE,
  every baseline SAE with α > 0 and PCA (``--dense-acdc`` adds α = 0), and
  for the Gated SAE at the middle site (how far attribution is from ACDC
  there);
* every chosen feature set also patched, unchanged, into ``--heldout-prompts``
  (50) prompts built from the other templates and names.

Every step resumes: the harvest and the training from their checkpoints, each
curve from ``--work``/curves-SITE/parts, exact ACDC after its last finished
threshold. A run of some stages adds its curves to the results JSON of an
earlier run with the same settings. The commands it runs are the
library's own (printed); nothing it builds is kept in git.

    python benchmarks/kl_vs_patches.py                       # everything (hours on 2 CPU cores)
    python benchmarks/kl_vs_patches.py --stage attribution   # only the attribution curves (and what they need)
    python benchmarks/kl_vs_patches.py --table               # docs/ioi.md's tables, from the results JSON

Writes ``benchmarks/results/kl_vs_patches.json`` + ``.png`` (the late site),
``kl_vs_patches_layers.png`` (every site) and ``kl_vs_patches_heldout.png``
(selection vs held-out prompts).
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import ROOT, describe, repo_path  # noqa: E402

import circuitsae  # noqa: E402
from circuitsae.circuits.curves import halving, halving_table, label, transfer  # noqa: E402
from circuitsae.commands.ioi import IOIRun, run_ioi  # noqa: E402
from circuitsae.io import digest  # noqa: E402
from circuitsae.viz.plots import plot_curves, plot_transfer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def prepare(args: argparse.Namespace, need: set[str]) -> dict[str, list[str]]:
    """Harvest and train unless done (both resume) what the sites in ``need`` use; return the dictionary folders
    per site."""
    work = Path(args.work)
    acts = work / "acts"
    t0 = time.perf_counter()
    meta = acts / "meta.json"
    if not meta.exists() or not json.loads(meta.read_text()).get("complete"):
        print(f"circuitsae harvest --sites {' '.join(args.sites)} --tokens {args.tokens} --out {acts} --device cpu")
        circuitsae.harvest(circuitsae.HarvestConfig(sites=tuple(args.sites), tokens=args.tokens, out=str(acts),
                                                    device="cpu"))  # fmt: skip
    full = [args.main_site, args.middle_site]
    runs = [
        ("saes", full, ("relu",), (0.0, *args.coefficients), {"expansion": args.expansion}),
        ("saes-gated", full, ("gated",), (args.gated,), {"gated_expansion": args.gated_expansion}),
        ("saes-layers", [s for s in args.sites if s not in full], ("relu",), (args.coefficients[0],),
         {"expansion": args.expansion}),
        ("saes-layers-gated", [s for s in args.sites if s not in full], ("gated",), (args.gated,),
         {"gated_expansion": args.gated_expansion}),
    ]  # fmt: skip
    for out, sites, arch, coefs, width in runs:
        if not sites or not need & set(sites):
            continue
        want = [work / out / f"{s}-{arch[0]}-c{c:g}" for s in sites for c in coefs]
        if not all(p.exists() for p in want):
            flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in width.items())
            print(f"circuitsae train --store {acts} --out {work / out} --sites {' '.join(sites)} --arch {arch[0]} "
                  f"--coefficients {' '.join(f'{c:g}' for c in coefs)} {flags} --lr 1e-3 --batch-size {args.batch} "
                  "--device cpu")  # fmt: skip
            circuitsae.train(store=str(acts), out=str(work / out), sites=tuple(sites), arch=arch, coefficients=coefs,
                             lr=1e-3, batch_size=args.batch, epochs=1, device="cpu", **width)  # fmt: skip
    folders: dict[str, list[str]] = {}
    for out, *_ in runs:
        for p in sorted((work / out).glob("resid.*-*")):
            if p.is_dir() and (p / "cfg.json").exists():
                folders.setdefault(p.name.split("-")[0], []).append(str(p))
    print(f"prepared in {time.perf_counter() - t0:.0f} s")
    return folders


def store_identity(args: argparse.Namespace) -> str:
    """What the results were computed from: the store's config and its first training shard at the main site
    (a harvest elsewhere, or of other text, differs there)."""
    acts = Path(args.work) / "acts"
    return digest([acts / "meta.json", acts / f"train-00000.{args.main_site}.npy"])


def dictionary_identity(path: str) -> "str | None":
    """A saved dictionary's files (PCA is fitted on the store: the store's identity covers it)."""
    return digest([path]) if path != "pca" and Path(path).is_dir() else None


def stages(args: argparse.Namespace, folders: dict[str, list[str]]) -> list[tuple[str, str, list[str], dict]]:
    """(name, site, dictionaries, run_ioi options), cheapest first; later stages reuse earlier curves."""

    def gated(site):
        return [p for p in folders[site] if "-gated-" in p]

    def sparse(site):  # the Gated SAE first, then the baseline SAEs of --acdc-coefficients
        chosen = {f"-relu-c{c:g}" for c in args.acdc_coefficients}
        return gated(site) + [p for p in folders[site] if any(p.endswith(c) for c in chosen)]

    out = [(f"attribution {s}", s, folders[s], dict(acdc=False, attribution=True, pca=True)) for s in args.sites]
    out += [
        (f"acdc {args.main_site} sparse", args.main_site, sparse(args.main_site),
         dict(acdc=True, acdc_dense=False, attribution=False, pca=False)),
        (f"acdc {args.main_site} PCA", args.main_site, gated(args.main_site),
         dict(acdc=True, acdc_dense=True, attribution=False, pca=True)),
        (f"acdc {args.middle_site} gated", args.middle_site, gated(args.middle_site),
         dict(acdc=True, acdc_dense=False, attribution=False, pca=False, thresholds=args.middle_thresholds)),
    ]  # fmt: skip
    if args.dense_acdc:
        out.append((f"acdc {args.main_site} dense", args.main_site, folders[args.main_site],
                    dict(acdc=True, acdc_dense=True, attribution=False, pca=False)))  # fmt: skip
    return [s for s in out if args.stage == "all" or s[0].startswith(args.stage)]


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` writes what is finished
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", nargs="+", default=["resid.27", "resid.15", "resid.21", "resid.9"])
    ap.add_argument("--main-site", default="resid.27", help="the late site (Fig. 3 analogue)")
    ap.add_argument("--middle-site", default="resid.15", help="the middle site (the paper's layer 11 of 24)")
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--coefficients", type=float, nargs="+", default=[1.0, 2.0], help="baseline α (α = 0 is added)")
    ap.add_argument("--gated", type=float, default=2.0, help="Gated SAE λ")
    ap.add_argument("--expansion", type=float, default=4.0)
    ap.add_argument("--gated-expansion", type=float, default=3.0, help="3/4 of the baseline's, as the Gated paper")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=50, help="selection prompts")
    ap.add_argument("--heldout-prompts", type=int, default=50, help="evaluation prompts: other names and templates")
    ap.add_argument("--thresholds", type=int, default=20,
                    help="ACDC thresholds, log-spaced over [1e-5, 1] (the paper: 50)")  # fmt: skip
    ap.add_argument(
        "--middle-thresholds",
        type=int,
        default=None,
        help="ACDC thresholds at the middle site (default: --thresholds; dearer there, more layers follow)",
    )
    ap.add_argument("--acdc-coefficients", type=float, nargs="+", default=None,
                    help="baseline α with exact ACDC at the late site (default: every α > 0)")  # fmt: skip
    ap.add_argument("--dense-acdc", action="store_true", help="exact ACDC also for α = 0 (hours on a CPU)")
    ap.add_argument("--stage", default="all", help="run only the stages whose name starts with this")
    ap.add_argument("--work", default="runs/ioi-paper")
    ap.add_argument("--results-name", default="kl_vs_patches", help="stem of the files in benchmarks/results")
    ap.add_argument("--table", action="store_true",
                    help="print docs/ioi.md's tables from the results JSON (halving and transfer recomputed from "
                         "the curves' records; the JSON is not written) and exit")  # fmt: skip
    args = ap.parse_args()
    if args.table:
        out = IOIRun.from_json(RESULTS / f"{args.results_name}.json").to_json()
        print(sae_table(out), halving_table(out), sep="\n\n")
        return
    args.acdc_coefficients = args.acdc_coefficients or args.coefficients
    args.middle_thresholds = args.middle_thresholds or args.thresholds
    if args.main_site not in args.sites or args.middle_site not in args.sites:
        ap.error("--main-site and --middle-site must be among --sites")
    every = {s: [] for s in args.sites}
    folders = prepare(args, {site for _, site, _, _ in stages(args, every)})
    model = circuitsae.load_model("smollm2-135m", device="cpu")
    reports, seconds, commands = earlier(args)
    for name, site, dicts, opts in stages(args, {**every, **folders}):
        if not opts["attribution"]:  # exact ACDC is the costly stage: curves an earlier run finished are kept
            done = {lab for s, lab, m in reports if s == site and m == "acdc"}
            if not opts["pca"]:  # (the PCA stage's dictionaries are only where PCA is fitted)
                dicts = [p for p in dicts if label(circuitsae.load_dictionary(p)) not in done]
            if not dicts or (opts["pca"] and "PCA" in done):
                print(f"== {name}: done in an earlier run")
                continue
        t0 = time.perf_counter()
        print(f"== {name}: {len(dicts)} dictionaries")
        try:
            rep = run_ioi(dictionaries=dicts, model=model, prompts=args.prompts, heldout_prompts=args.heldout_prompts,
                          out=str(Path(args.work) / f"curves-{site}"), **{"thresholds": args.thresholds, **opts})  # fmt: skip
            for r in rep.results:
                reports[(r["site"], r["label"], r["method"])] = {
                    **r,
                    "ioi": rep.ioi,
                    "ioi_heldout": rep.ioi_heldout,
                    "dictionary_identity": dictionary_identity(r["path"]),
                }
            # the run that computed it, not a re-read: curves read back from their parts count their own times
            took = max(time.perf_counter() - t0, sum(r["seconds"] for r in rep.results))
            seconds.setdefault(name, took)
        finally:
            write(args, reports, seconds, commands)


def earlier(args: argparse.Namespace) -> tuple[dict, dict, list[str]]:
    """Curves, stage times and commands of an earlier run with the same settings on the same store (other
    stages): this run adds to them, and ends the list of commands. A curve whose dictionary's files have
    changed since (retrained) is dropped, so one results file never mixes two trainings of a dictionary; a
    results file of another store (another harvest) is not added to at all."""
    this = shlex.join(["python", "benchmarks/kl_vs_patches.py", *sys.argv[1:]])
    path = RESULTS / f"{args.results_name}.json"
    old = IOIRun.from_json(path).to_json() if path.exists() else {}
    same = ("tokens", "prompts", "heldout_prompts", "thresholds", "main_site", "middle_site")
    if not old or any(old.get(k) != getattr(args, k) for k in same):
        return {}, {}, [this]
    if old.get("store_identity") != store_identity(args):
        print(f"{path.name} was computed on another store (or before stores were recorded): starting afresh")
        return {}, {}, [this]
    extra = {"ioi": old["ioi"], "ioi_heldout": old["ioi_heldout"]}
    reports = {}
    middle = old.get("middle_thresholds", old["thresholds"])  # (results from before the option: the same)
    for r in old["results"]:
        if r["path"] != "pca" and r.get("dictionary_identity") != dictionary_identity(str(ROOT / r["path"])):
            print(f"dropped the earlier {r['method']} curve of {r['label']} at {r['site']}: its files changed")
            continue
        if r["method"] == "acdc" and r["site"] == args.middle_site and middle != args.middle_thresholds:
            print(f"dropped the earlier ACDC curve of {r['label']} at {r['site']}: {middle} thresholds, not "
                  f"{args.middle_thresholds}")  # fmt: skip
            continue
        reports[(r["site"], r["label"], r["method"])] = {**r, **extra}
    commands = [c for c in old.get("commands", [old.get("command")]) if c and c != this] + [this]
    return reports, dict(old.get("seconds_by_stage", {})), commands


def write(args: argparse.Namespace, reports: dict, seconds: dict, commands: list[str]) -> None:
    if not reports:
        return
    results = sorted(reports.values(), key=lambda r: (int(r["site"].split(".")[1]), r["label"], r["method"]))
    main = [r for r in results if r["site"] == args.main_site] or results
    out = {
        "machine": describe(),
        "store_identity": store_identity(args),
        "commands": commands,
        "model": "smollm2-135m",
        "main_site": args.main_site,
        "middle_site": args.middle_site,
        "sites": sorted({r["site"] for r in results}, key=lambda s: int(s.split(".")[1])),
        "tokens": args.tokens,
        "prompts": args.prompts,
        "heldout_prompts": args.heldout_prompts,
        "thresholds": args.thresholds,
        "middle_thresholds": args.middle_thresholds,
        "ioi": main[0]["ioi"],
        "ioi_heldout": main[0]["ioi_heldout"],
        "seconds_by_stage": seconds,
        "training": training_costs(Path(args.work)),
        "halving": [halving(r) for r in results],
        "transfer": [transfer(r) for r in results],
        "results": [
            {k: v for k, v in r.items() if k not in ("ioi", "ioi_heldout", "path")}
            | {"path": r["path"] if r["path"] == "pca" else repo_path(r["path"])}
            for r in results
        ],  # fmt: skip
    }
    RESULTS.mkdir(exist_ok=True)
    name = args.results_name
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1))
    report = {"model": "smollm2-135m", "prompts": args.prompts, "heldout_prompts": args.heldout_prompts}
    plot_curves({**report, "results": main}, RESULTS / f"{name}.png")
    if len(out["sites"]) > 1:
        plot_curves({**report, "results": results}, RESULTS / f"{name}_layers.png", sites=out["sites"])
    if any("records" in r.get("heldout", {}) for r in results):
        plot_transfer({**report, "results": results}, RESULTS / f"{name}_heldout.png")
    print(f"wrote {RESULTS / name}.json: {len(results)} curves at {out['sites']}")


def sae_table(out: dict) -> str:
    """docs/ioi.md's table of the trained SAEs: L0 / FVU of the final training batch, per site and dictionary."""
    final = {k: v for t in out["training"].values() for k, v in t["final"].items()}  # "resid.15-relu-c1": {...}
    columns = sorted({k.split("-", 1)[1] for k in final}, key=lambda c: (c.startswith("gated"), c))
    names = {c: ("Gated λ = " if c.startswith("gated") else "α = ") + c.rsplit("-c", 1)[1] for c in columns}
    rows = ["| site | " + " | ".join(f"{names[c]} L0 / FVU" for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for site in sorted({k.split("-")[0] for k in final}, key=lambda s: int(s.split(".")[1])):
        cells = [final.get(f"{site}-{c}") for c in columns]
        rows.append(f"| {site} | " + " | ".join("–" if f is None else f"{f['l0']:.0f} / {f['fvu']:.2g}" for f in cells)
                    + " |")  # fmt: skip
    return "\n".join(rows)


def training_costs(work: Path) -> dict:
    """Steps, seconds (of the session that finished it) and activations/s of each training command."""
    out = {}
    for f in sorted(work.glob("saes*/train.json")):
        t = json.loads(f.read_text())
        out[f.parent.name] = {
            "runs": sorted(t["runs"]),
            "steps": t["steps"],
            "seconds_last_session": t.get("seconds_last_session"),
            "activations_per_second": t.get("activations_per_second"),
            "final": {k: {m: v[m] for m in ("l0", "fvu", "gamma", "dead_fraction")} for k, v in t["runs"].items()},
        }
    return out


if __name__ == "__main__":
    main()
