"""Wall time of ``make demo`` per step and its headline figures, with the machine: ``benchmarks/results/demo.json``.

    python benchmarks/demo.py                           # run the demo into a fresh folder, then record it
    python benchmarks/demo.py --model gemma3-270m       # the same on Gemma 3: results/demo-gemma3-270m.json
    python benchmarks/demo.py --summary runs/demo/summary.json   # record a finished run's own timings

The timings are the demo's own (``run_demo`` times each step and writes them
to ``summary.json``); a resumed run times only what it redid, so record a run
that started from an empty folder. Beside the JSON go copies of the run's IOI
curves and causal tree (``<stem>-kl_vs_patches.png``, ``<stem>-causal_tree.png``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, repo_path  # noqa: E402

import circuitsae  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summary", help="summary.json of a finished demo run (default: run one now)")
    ap.add_argument("--out", default="runs/demo-bench", help="where to run the demo (emptied first)")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    if args.summary:
        summary = json.loads(Path(args.summary).read_text())
    else:
        shutil.rmtree(args.out, ignore_errors=True)
        summary = circuitsae.run_demo(out=args.out, scale=args.scale, model=args.model)
    record = {
        "machine": describe(),
        "model": summary["model"],
        "model_dtype": summary.get("model_dtype", "float32"),
        "device": summary.get("device", "cpu"),
        "scale": summary["scale"],
        "sites": summary["sites"],
        "train_tokens": summary["train_tokens"],
        "ioi_prompts": summary["ioi"]["prompts"],
        "ioi_thresholds": summary["ioi"]["thresholds"],
        "seconds": summary["seconds"],
        "tree_seconds": summary["tree"]["seconds"],
        "tree_nodes": summary["tree"]["nodes"],
        "saes": summary["saes"],
        "ioi": {
            k: summary["ioi"].get(k)
            for k in ("site", "prompts", "thresholds", "performance", "finding", "rows", "skipped")
        },
        "feature": {
            k: summary["feature"].get(k) for k in ("site", "feature", "token", "precision", "recall", "unembed")
        },
        "source": repo_path(Path(args.summary).parent if args.summary else Path(args.out)),
    }
    stem = "demo" if record["model"] == "smollm2-135m" else f"demo-{record['model']}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=1))
    for name, src in (("kl_vs_patches", summary["ioi"]["png"]), ("causal_tree", summary["tree"].get("png"))):
        if src and Path(src).is_file():
            shutil.copy(src, RESULTS / f"{stem}-{name}.png")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
