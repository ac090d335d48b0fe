"""Do the figures move between two commits? The same small pipeline run by both, one after the other, here.

Runs, with the library of ``--base`` (a git commit, checked out into a temporary worktree) and then with this
working tree, on the real SmolLM2 and in float32 on the CPU:

1. harvest one site (``--tokens`` tokens of the embedded corpus);
2. train a baseline SAE and a Gated SAE on it;
3. evaluate both (L0, FVU, γ, loss recovered);
4. IOI feature patching: exact ACDC and attribution order for the baseline SAE;
5. the causal tree of one feature of the baseline SAE, one level deep.

and compares every output: the stored activations and saved SAEs byte for byte, the metrics, the ACDC and
attribution records and the tree's edges. Each library runs in its own process; neither sees the other's
files. Wall times are recorded too, as the ratio new / base (same machine, same run).

    python benchmarks/regression.py --base ec29d4c       # ~15 minutes on 2 CPU cores

Writes ``benchmarks/results/regression.json`` (with the machine and both commits).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: the pipeline, run by ``python -c`` with the library under test first on sys.path; writes out.json
PIPELINE = r"""
import json, sys, time, hashlib
from pathlib import Path
import torch
import circuitsae
from circuitsae import acdc, causal_tree, find_token_feature  # public names, in the old layout and the new
work, site, tokens = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
prev = f"resid.{int(site.split('.')[1]) - 1}"
t, out = {}, {}
t0 = time.perf_counter()
lm = circuitsae.load_model("smollm2-135m", device="cpu", dtype="float32")
store = circuitsae.harvest(model=lm, sites=(prev, site), tokens=tokens, out=str(work / "acts"), progress=False)
t["harvest"] = time.perf_counter() - t0
files = sorted(p for p in (work / "acts").iterdir() if p.suffix == ".npy")
out["store_sha256"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
t0 = time.perf_counter()
common = dict(store=str(work / "acts"), lr=1e-3, batch_size=1024, epochs=2, device="cpu", progress=False)
saes = circuitsae.train(out=str(work / "saes"), arch=("relu", "gated"), coefficients=(1.0,), expansion=4.0, **common)
t["train"] = time.perf_counter() - t0
out["sae_sha256"] = {n: hashlib.sha256((work / "saes" / n / "sae.safetensors").read_bytes()).hexdigest() for n in saes}
t0 = time.perf_counter()
circuitsae.evaluate(dictionaries=(str(work / "saes"),), model=lm, out=str(work / "eval.json"), progress=False)
t["evaluate"] = time.perf_counter() - t0
keys = ("l0", "fvu", "gamma", "ce_clean", "ce_spliced", "ce_zero", "loss_recovered", "kl")
ev = json.loads((work / "eval.json").read_text())  # the file, whatever type evaluate() returns
out["eval"] = {n: {k: r[k] for k in keys} for n, r in ev["results"].items()}
sae = circuitsae.load_dictionary(work / "saes" / f"{site}-relu-c1")
ds = circuitsae.make_ioi(lm, n=6, seed=0)
for order in ("acdc", "attribution"):
    t0 = time.perf_counter()
    r = acdc(lm, sae, site, ds, thresholds=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1], order=order, progress=False)
    t[order] = time.perf_counter() - t0
    out[order] = {"records": r.records, "order": r.order[:50], "n_candidates": r.n_candidates}
dicts = {s: circuitsae.load_dictionary(work / "saes" / f"{s}-relu-c1") for s in (prev, site)}
pick = find_token_feature(dicts[site], store, site, lm.tokenizer, progress=False)
t0 = time.perf_counter()
g = causal_tree(lm, dicts, (site, pick["feature"]), depth=1, branching=5, contexts=8, progress=False)
t["tree"] = time.perf_counter() - t0
out["tree"] = {"feature": pick["feature"], "edges": sorted([u, v, e["effect"]] for u, v, e in g.edges(data=True))}
out["seconds"] = t
out["library"] = str(Path(circuitsae.__file__).parent)
(work / "out.json").write_text(json.dumps(out))
"""


def run(library: Path, work: Path, site: str, tokens: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(library), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", PIPELINE, str(work), site, str(tokens)], env=env, check=True, cwd=work)
    out = json.loads((work / "out.json").read_text())
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def compare(a: dict, b: dict) -> dict:
    """Exact equalities of everything but the timings, and the largest numeric difference where not equal."""

    def diff(x, y) -> float:
        if isinstance(x, dict):
            return max((diff(x[k], y.get(k)) for k in x), default=0.0)
        if isinstance(x, list):
            return max((diff(p, q) for p, q in zip(x, y)), default=0.0) if len(x) == len(y) else float("inf")
        if isinstance(x, float) and isinstance(y, float):
            return abs(x - y)
        return 0.0 if x == y else float("inf")

    return {k: {"equal": a[k] == b[k], "max_abs_difference": diff(a[k], b[k])}
            for k in a if k not in ("seconds", "wall_seconds", "library")}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the git commit to compare this working tree with")
    ap.add_argument("--site", default="resid.27")
    ap.add_argument("--tokens", type=int, default=30_000)
    args = ap.parse_args()
    base = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, capture_output=True, text=True, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "circuitsae"], cwd=ROOT, capture_output=True, text=True)
    with tempfile.TemporaryDirectory(prefix="circuitsae-regression-") as tmp:
        tmp = Path(tmp)
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tmp / "base"), base.stdout.strip()],
                       cwd=ROOT, check=True)  # fmt: skip
        try:
            outs = {}
            for name, library in (("base", tmp / "base"), ("new", ROOT)):
                (tmp / f"work-{name}").mkdir()
                outs[name] = run(library, tmp / f"work-{name}", args.site, args.tokens)
                assert Path(outs[name].pop("library")).parent == library.resolve(), "ran the wrong library"
                print(name, json.dumps(outs[name]["seconds"]))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "base")], cwd=ROOT, check=False)
    result = {
        "machine": describe(),
        "base_commit": base.stdout.strip(),
        "new_commit": head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else ""),
        "site": args.site,
        "tokens": args.tokens,
        "comparison": compare(outs["base"], outs["new"]),
        "seconds": {name: o["seconds"] | {"wall": o["wall_seconds"]} for name, o in outs.items()},
        "time_ratio_new_over_base": {
            k: outs["new"]["seconds"][k] / outs["base"]["seconds"][k] for k in outs["base"]["seconds"]
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "regression.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["comparison"], indent=1))
    print(json.dumps(result["time_ratio_new_over_base"], indent=1))


if __name__ == "__main__":
    main()
