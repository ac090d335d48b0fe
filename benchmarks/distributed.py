"""What distribution costs on this machine: 2 ranks x 1 thread vs 1 process x 2 threads, training and harvesting.

* training: one ReLU SAE (d_sae = 8·576) on real SmolLM2 activations (the reader benchmark's store), batch 4096,
  ``circuitsae train`` in one process with 2 threads vs ``torchrun --nproc_per_node 2`` (gloo, 1 thread each,
  data-parallel); activations/s from each run's ``train.json`` (the training loop only), and the bytes
  all-reduced per step;
* harvesting: ``circuitsae harvest`` of SmolLM2 at resid.3, one process with 2 threads vs 2 ranks with 1 thread,
  tokens/s over the whole command (model loading included on both sides), and whether the stores are
  byte-identical — to the 2-thread process and to a 1-thread one (the same threads per process: float
  rounding of some matmul shapes depends on the thread count, not on the ranks).

The ratio (2 ranks / 1 process) is the goal's measure: >= 0.9 means distribution costs at most 10%.

    python benchmarks/distributed.py      # ~8 min on 2 CPU cores (harvests the reader benchmark's store first if missing)

Writes ``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, repo_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _run(cmd: list[str], threads: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    print("$", shlex.join(cmd), f"(OMP_NUM_THREADS={threads})", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default="runs/bench/reader-store", help="training store (benchmarks/reader.py's)")
    ap.add_argument("--site", default="resid.2")
    ap.add_argument("--d-sae", type=int, default=8 * 576)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--harvest-tokens", type=int, default=200_000)
    ap.add_argument("--work", default="runs/bench/distributed")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    py = [sys.executable, "-m", "circuitsae"]
    if not (Path(args.store) / "meta.json").is_file():
        subprocess.run([sys.executable, str(Path(__file__).parent / "reader.py")], check=True)

    train = ["train", "--store", args.store, "--sites", args.site, "--arch", "relu", "--expansion",
             str(args.d_sae / 576), "--batch-size", str(args.batch_size), "--device", "cpu"]  # fmt: skip
    runs = {}
    for name, launcher, threads in (("1 process x 2 threads", py, 2), ("2 ranks x 1 thread", _torchrun(2) + ["-m",
                                    "circuitsae"], 1)):  # fmt: skip
        out = work / ("train-" + name.split()[0])
        wall = _run([*launcher, *train, "--out", str(out)], threads)
        summary = json.loads((out / "train.json").read_text())
        runs[name] = {
            "activations_per_s": summary["activations_per_second"],
            "loop_seconds": summary["seconds_last_session"],
            "wall_seconds": wall,
            "allreduce_bytes_per_step": summary.get("allreduce_bytes_per_step"),
            "steps": summary["steps"],
        }
    one, two = runs["1 process x 2 threads"], runs["2 ranks x 1 thread"]

    harvest = ["harvest", "--sites", "resid.3", "--tokens", str(args.harvest_tokens), "--heldout-tokens", "4096"]
    hv = {}
    for name, launcher, threads in (("1 process x 2 threads", py, 2), ("2 ranks x 1 thread", _torchrun(2) + ["-m",
                                    "circuitsae"], 1)):  # fmt: skip
        out = work / ("harvest-" + name.split()[0])
        wall = _run([*launcher, *harvest, "--out", str(out)], threads)
        hv[name] = {"tokens_per_s": (args.harvest_tokens + 4096) / wall, "wall_seconds": wall}
    # float rounding of some matmul shapes depends on the threads per process: compare with the same threads too
    wall = _run([*py, *harvest, "--out", str(work / "harvest-1t")], 1)
    hv["1 process x 1 thread"] = {"tokens_per_s": (args.harvest_tokens + 4096) / wall, "wall_seconds": wall}
    identical = same_files(work / "harvest-1", work / "harvest-2")
    identical_1t = same_files(work / "harvest-1t", work / "harvest-2")

    result = {
        "machine": describe(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "command": "python benchmarks/distributed.py " + shlex.join(sys.argv[1:]),
        "training": {
            "store": repo_path(args.store),
            "site": args.site,
            "d_sae": args.d_sae,
            "batch_size": args.batch_size,
            "command": "circuitsae " + shlex.join(train) + " --out ...",
            "runs": runs,
            "ratio_2_ranks_over_1_process": two["activations_per_s"] / one["activations_per_s"],
            "allreduce_bytes_per_step": two["allreduce_bytes_per_step"],
        },
        "harvest": {
            "command": "circuitsae " + shlex.join(harvest) + " --out ...",
            "runs": hv,
            "ratio_2_ranks_over_1_process": hv["2 ranks x 1 thread"]["tokens_per_s"]
            / hv["1 process x 2 threads"]["tokens_per_s"],
            "store_byte_identical_to_1_process_x_2_threads": identical,
            "store_byte_identical_to_1_process_x_1_thread": identical_1t,
        },
    }
    result["goals"] = {
        "training ratio >= 0.9": result["training"]["ratio_2_ranks_over_1_process"] >= 0.9,
        "harvest ratio >= 0.9": result["harvest"]["ratio_2_ranks_over_1_process"] >= 0.9,
        "parallel store byte-identical to one process with the same threads": identical_1t,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("training", "harvest", "goals")}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
