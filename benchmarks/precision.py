"""What the model dtype does to the measurements, on the real models: float32 vs bfloat16 vs float16.

For each model (SmolLM2-135M, Gemma 3 270M) and dtype, on the same IOI prompts:

* the IOI skill (logit difference IO − S, accuracy) and the wall time of that forward pass on this machine;
* how far the half-precision run is from float32: D_KL(float32 ‖ dtype) at the final token;
* what it does to a patching curve, the quantity ACDC thresholds: a PCA dictionary (a rotation, fitted on
  the site's float32 activations) patches growing prefixes of one fixed feature order (float32 attribution
  order) from the target into the base prompts, and KL(patched ‖ target) is measured in each dtype. The
  largest difference from float32 along the curve is the resolution below which a half-precision ACDC
  threshold decides on rounding, not on the features.

A family whose activations overflow float16 (Gemma) is refused in float16; the row records the refusal.

    python benchmarks/precision.py                     # both models, ~10 minutes on 2 CPU cores

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
from circuitsae.circuits.acdc import acdc  # noqa: E402
from circuitsae.metrics import kl_divergence  # noqa: E402
from circuitsae.tasks.ioi import final_logits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SITES = {"smollm2-135m": "resid.27", "gemma3-270m": "resid.15"}
PREFIXES = (1, 4, 16, 64, 256)


def final(model, ds) -> torch.Tensor:
    with torch.no_grad(), model.trace(ds.base):
        logits = model.output.logits.save()
    return final_logits(logits.float(), ds)


def curve(model, pca, site, ds, order) -> list[float]:
    """KL(patched ‖ target) with the first n features of ``order`` patched, n in PREFIXES and all."""
    sizes = [n for n in PREFIXES if n < len(order)] + [len(order)]
    return [
        circuitsae.patch_features(model, pca, site, ds.base, ds.target, order[:n], lengths=ds.lengths).kl for n in sizes
    ]


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
        site = SITES[name]
        f32 = circuitsae.load_model(name, device="cpu", dtype="float32")
        store = circuitsae.harvest(model=f32, sites=(site,), tokens=args.pca_tokens, out=f"{args.work}/{name}")
        pca = circuitsae.PCADictionary.fit(store, site=site)
        ds = circuitsae.make_ioi(f32, n=args.prompts, seed=0)
        order = acdc(f32, pca, site, ds, order="attribution", progress=False).order
        ref, ref_curve = final(f32, ds), curve(f32, pca, site, ds, order)
        del f32
        for dtype in args.dtypes:
            row = {"model": name, "dtype": dtype, "site": site, "prefix_sizes": [*PREFIXES, len(order)]}
            try:
                model = circuitsae.load_model(name, device="cpu", dtype=dtype)
            except circuitsae.CircuitSAEError as e:
                rows.append({**row, "refused": str(e)})
                print(json.dumps(rows[-1]))
                continue
            t0 = time.perf_counter()
            perf = circuitsae.ioi_performance(model, ds)
            seconds = time.perf_counter() - t0
            kls = curve(model, pca, site, ds, order)
            row.update(
                logit_diff=perf["logit_diff"],
                accuracy=perf["accuracy"],
                ioi_forward_seconds=seconds,
                kl_from_float32=float(kl_divergence(ref, final(model, ds)).mean()),
                patching_curve_kl=kls,
                patching_curve_max_abs_error=max(abs(a - b) for a, b in zip(kls, ref_curve)),
            )
            rows.append(row)
            print(json.dumps(row))
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": describe(), "prompts": args.prompts, "rows": rows}
    (RESULTS / "precision.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
