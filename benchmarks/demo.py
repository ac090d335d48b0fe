"""Wall time of ``make demo`` per step, with the machine: ``benchmarks/results/demo.json``.

    python benchmarks/demo.py                           # run the demo into a fresh folder, then record it
    python benchmarks/demo.py --summary runs/demo/summary.json   # record a finished run's own timings

The timings are the demo's own (``run_demo`` times each step and writes them
to ``summary.json``); a resumed run times only what it redid, so record a run
that started from an empty folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

import circuitsae  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summary", help="summary.json of a finished demo run (default: run one now)")
    ap.add_argument("--out", default="runs/demo-bench", help="where to run the demo (emptied first)")
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args()
    if args.summary:
        summary = json.loads(Path(args.summary).read_text())
    else:
        shutil.rmtree(args.out, ignore_errors=True)
        summary = circuitsae.run_demo(out=args.out, scale=args.scale)
    record = {
        "machine": describe(),
        "scale": summary["scale"],
        "sites": summary["sites"],
        "train_tokens": summary["train_tokens"],
        "ioi_prompts": summary["ioi"]["prompts"],
        "ioi_thresholds": summary["ioi"]["thresholds"],
        "seconds": summary["seconds"],
        "tree_seconds": summary["tree"]["seconds"],
        "tree_nodes": summary["tree"]["nodes"],
        "source": args.summary or args.out,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
