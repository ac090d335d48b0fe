"""How long ``import circuitsae`` takes, at this working tree and at another commit, side by side in one run.

Each import runs in a fresh interpreter (``python -X importtime -c "import circuitsae"``) with the library under
test first on ``sys.path``; the figure is the cumulative time Python reports for the ``circuitsae`` package,
``--repeats`` times each, alternating the two libraries.

    python benchmarks/import_time.py --base 9aafccf

Writes ``benchmarks/results/import_time.json`` (with the machine and both commits).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def import_seconds(library: Path) -> float:
    """Cumulative seconds of ``import circuitsae`` from ``library``, in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(library)}
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import circuitsae"],
        env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True,
    ).stderr  # fmt: skip
    line = next(row for row in reversed(err.splitlines()) if row.rstrip().endswith("| circuitsae"))
    return int(line.split("|")[1]) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the git commit to compare this working tree with")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    base = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, capture_output=True, text=True, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    with tempfile.TemporaryDirectory(prefix="circuitsae-import-") as tmp:
        worktree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(worktree), base.stdout.strip()],
                       cwd=ROOT, check=True)  # fmt: skip
        try:
            times: dict[str, list[float]] = {"base": [], "new": []}
            for _ in range(args.repeats):
                times["base"].append(import_seconds(worktree))
                times["new"].append(import_seconds(ROOT))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "machine": describe(),
        "base_commit": base.stdout.strip(),
        "new_commit": head.stdout.strip(),
        "seconds": times,
        "median_seconds": median,
        "ratio_new_over_base": median["new"] / median["base"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "import_time.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"median_seconds": median, "ratio_new_over_base": result["ratio_new_over_base"]}, indent=1))


if __name__ == "__main__":
    main()
