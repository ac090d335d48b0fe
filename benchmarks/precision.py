"""What the model dtype does to the measurements, on the real models: float32 vs bfloat16 vs float16.

For each model (SmolLM2-135M, Gemma 3 270M) and dtype, on the same IOI prompts:

* the IOI skill (logit difference IO − S, accuracy) and the wall time of that forward pass;
* how far the half-precision run is from float32: D_KL(float32 ‖ dtype) at the final token;
* the noise floor of an ACDC decision: a PCA dictionary (a rotation, fitted on the site's activations) with
  every feature patched is the target run, so KL(patched ‖ target) should be 0; what is left is the noise of
  the fast evaluator's path against the model's own run in that dtype. ACDC thresholds below this floor
  decide on noise.

    python benchmarks/precision.py                     # both models, ~5 minutes on 2 CPU cores

Writes ``benchmarks/results/precision.json`` (with the machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

import circuitsae  # noqa: E402
from circuitsae.downstream import make_evaluator  # noqa: E402
from circuitsae.metrics import kl_divergence  # noqa: E402
from circuitsae.patching import feature_deltas  # noqa: E402
from circuitsae.tasks.ioi import final_logits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SITES = {"smollm2-135m": "resid.27", "gemma3-270m": "resid.15"}


def final(model, ds) -> torch.Tensor:
    with torch.no_grad(), model.trace(ds.base):
        logits = model.output.logits.save()
    return final_logits(logits.float(), ds)


def measure(name: str, dtype: str, ds_seed: int, prompts: int, pca: circuitsae.PCADictionary, ref: torch.Tensor):
    model = circuitsae.load_model(name, device="cpu", dtype=dtype)
    ds = circuitsae.make_ioi(model, n=prompts, seed=ds_seed)
    t0 = time.perf_counter()
    perf = circuitsae.ioi_performance(model, ds)
    seconds = time.perf_counter() - t0
    z = final(model, ds)
    site = SITES[name]
    fd = feature_deltas(model, pca, site, ds.base, ds.target, lengths=ds.lengths)
    ev = make_evaluator(model, fd, ds.base)
    every = ev.set_state(torch.ones(fd.n_candidates, dtype=torch.bool))["kl"]
    return {
        "model": name,
        "dtype": dtype,
        "site": site,
        "logit_diff": perf["logit_diff"],
        "accuracy": perf["accuracy"],
        "ioi_forward_seconds": seconds,
        "kl_from_float32": float(kl_divergence(ref, z).mean()) if ref is not None else 0.0,
        "evaluator": ev.name,
        "kl_pca_all_patched": float(every.mean()),
        "kl_pca_all_patched_max": float(every.max()),
    }, z


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SITES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--pca-tokens", type=int, default=20_000, help="activations the PCA rotation is fitted on")
    ap.add_argument("--work", default="runs/precision")
    args = ap.parse_args()
    if args.dtypes[0] != "float32":
        ap.error("the first dtype must be float32: the others are compared with it")
    rows = []
    for name in args.models:
        store = circuitsae.harvest(model=circuitsae.load_model(name, device="cpu", dtype="float32"),
                                   sites=(SITES[name],), tokens=args.pca_tokens, out=f"{args.work}/{name}")  # fmt: skip
        pca = circuitsae.PCADictionary.fit(store, site=SITES[name])
        ref = None
        for dtype in args.dtypes:
            row, z = measure(name, dtype, 0, args.prompts, pca, ref)
            ref = z if ref is None else ref
            rows.append(row)
            print(json.dumps(row))
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": describe(), "prompts": args.prompts, "rows": rows}
    (RESULTS / "precision.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
