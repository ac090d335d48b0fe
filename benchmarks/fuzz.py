"""Bad input, deeper than ``make test``: the property-based fuzz suites with many examples, and their outcomes.

Runs ``tests/test_fuzz_cli.py`` (every numeric option of every command; training end to end on a tiny store
under a memory limit) and ``tests/test_fuzz_folders.py`` (random ``cfg.json`` contents and tensor dicts in
every supported folder format) with ``CIRCUITSAE_FUZZ_EXAMPLES`` examples per property, collects every
example's outcome from ``CIRCUITSAE_FUZZ_REPORT``, and writes the counts (by suite, case and outcome) with
the machine to ``benchmarks/results/fuzz.json``. An outcome ``other`` (an exception that is not a one-line
``CircuitSAEError``) fails the suite, so the file also says whether pytest passed.

    python benchmarks/fuzz.py --examples 300
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SUITES = ("tests/test_fuzz_cli.py", "tests/test_fuzz_folders.py")
#: a temporary folder in a message (pytest's or tempfile's)
TEMPORARY = re.compile(r"(?:/private)?/(?:tmp|var/folders/[^/\s]+/[^/\s]+/T)/[^/\s'\"]+")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=300, help="hypothesis examples per property")
    ap.add_argument("--out", default=str(RESULTS / "fuzz.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="circuitsae-fuzz-") as tmp:
        report = Path(tmp) / "outcomes.jsonl"
        env = {**os.environ, "CIRCUITSAE_FUZZ_EXAMPLES": str(args.examples), "CIRCUITSAE_FUZZ_REPORT": str(report)}
        t0 = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITES],
            cwd=ROOT, env=env, capture_output=True, text=True,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    by_suite: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_case: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    samples: dict[str, list[str]] = collections.defaultdict(list)
    for r in rows:
        case = r.get("case") or r.get("format") or "?"
        by_suite[r["suite"]][r["outcome"]] += 1
        by_case[f"{r['suite']}: {case}"][r["outcome"]] += 1
        key = f"{r['suite']}/{r['outcome']}"
        message = TEMPORARY.sub("{tmp}", r.get("message") or "")  # results hold no path of this machine
        if message and len(samples[key]) < 8 and message not in samples[key]:
            samples[key].append(message)
    summary = pytest_summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-300:]
    result = {
        "machine": describe(),
        "command": f"python benchmarks/fuzz.py --examples {args.examples}",
        "examples_per_property": args.examples,
        "pytest_passed": run.returncode == 0,
        "pytest_summary": summary,
        "seconds": round(seconds, 1),
        "inputs_tried": len(rows),
        "outcomes": {suite: dict(c) for suite, c in sorted(by_suite.items())},
        "by_case": {case: dict(c) for case, c in sorted(by_case.items())},
        "sample_messages": dict(sorted(samples.items())),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(rows)} inputs in {seconds:.0f} s: " + "; ".join(f"{s} {dict(c)}" for s, c in by_suite.items()))
    print(f"pytest: {pytest_summary}")
    if run.returncode:
        print(run.stdout[-3000:])
        sys.exit(1)


if __name__ == "__main__":
    main()
