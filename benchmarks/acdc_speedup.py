"""Exact ACDC (`circuitsae.circuits.acdc`) vs the plain sequential loop (`acdc_reference`), side by side in one run.

Both order the same dictionary's features on the same IOI prompts at the same
thresholds, one after the other in this process; the JSON gives both times,
their ratio, the evaluations each made, and every decision on which they
differ (the fast path computes each KL with other batch shapes, so a decision
whose margin is within rounding of 0 can go the other way).

    python benchmarks/acdc_speedup.py                                   # after benchmarks/kl_vs_patches.py
    python benchmarks/acdc_speedup.py --dictionary runs/demo/saes/resid.27-relu-c1

Writes ``benchmarks/results/kl_vs_patches_speedup.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import ROOT, describe, repo_path  # noqa: E402

import circuitsae  # noqa: E402
from circuitsae.circuits.acdc import acdc, acdc_reference  # noqa: E402
from circuitsae.tasks.ioi import make_ioi  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dictionary", default="runs/ioi-paper/saes/resid.27-relu-c2")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--thresholds", type=int, default=10, help="log-spaced over [1e-5, 1]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both runs)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kl_vs_patches_speedup.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = circuitsae.load_model("smollm2-135m", device="cpu")
    d = circuitsae.load_dictionary(args.dictionary)
    site = d.meta["site"]
    ds = make_ioi(model, n=args.prompts, seed=0)
    taus = np.logspace(-5, 0, args.thresholds)
    t0 = time.perf_counter()
    fast = acdc(model, d, site, ds, thresholds=taus, progress=True)
    ref = acdc_reference(model, d, site, ds, thresholds=taus, progress=True)
    differ = sorted(
        f for f in set(fast.removed_at) | set(ref.removed_at) if fast.removed_at.get(f) != ref.removed_at.get(f)
    )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    out = {
        "command": "python benchmarks/acdc_speedup.py " + " ".join(sys.argv[1:]),
        "commit": commit.strip() or None,
        "dictionary": repo_path(args.dictionary),
        "site": site,
        "prompts": args.prompts,
        "thresholds": args.thresholds,
        "candidates": fast.n_candidates,
        "engine": fast.engine,
        "acdc_seconds": fast.seconds,
        "reference_seconds": ref.seconds,
        "speedup": ref.seconds / fast.seconds,
        "acdc_evaluations": fast.evaluations,
        "reference_evaluations": ref.evaluations,
        "same_removals": fast.removed_at == ref.removed_at,
        "same_order": fast.order == ref.order,
        "differing_decisions": differ,
        "max_abs_kl_difference": max(abs(a["kl"] - b["kl"]) for a, b in zip(fast.records, ref.records)),
        "n_features": [r["n_features"] for r in fast.records],
        "reference_n_features": [r["n_features"] for r in ref.records],
        "wall_seconds": time.perf_counter() - t0,
        "machine": describe(),
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if "n_features" not in k}, indent=1))


if __name__ == "__main__":
    main()
