"""How fast the store is read for training: the fast reader, the previous one and a plain numpy memmap gather.

All in one run, on the same store of real SmolLM2-135M activations (float16, d = 576), batches of 4096 shuffled
rows, warm page cache, interleaved rounds (median):

* the fast reader (``circuitsae.data.reader.shuffled_batches``) alone, one site — files already verified in this
  process, and a first pass that verifies them;
* the previous reader (``reference_batches``: the store read as before this module, verification on and off);
* a plain numpy gather: every batch takes 4096 random rows of the memory-mapped shards (rows grouped by shard,
  ``mm[sorted rows]``), float16 as stored, no verification — the reference for what a reader could reach;
* one read serving two sites (rows/s per site);
* training (one ReLU SAE, d_sae = 8·576, the trainer's own step) fed by each reader vs the step alone on batches
  already in memory.

    python benchmarks/reader.py          # harvests 1M tokens at resid.2 and resid.3 first (~3 min, resumable)

Writes ``benchmarks/results/reader.json`` and ``reader.png``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, repo_path  # noqa: E402

import circuitsae  # noqa: E402
from circuitsae.data import store as store_mod  # noqa: E402
from circuitsae.training.trainer import TrainConfig, Trainer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def rows_per_s(batches, limit: int | None = None) -> float:
    t0, n = time.perf_counter(), 0
    for b in batches:
        n += (b[0] if isinstance(b, tuple) else b).shape[0]
        if limit is not None and n >= limit:
            break
    return n / (time.perf_counter() - t0)


def memmap_gather(store, site: str, batch_size: int, seed: int) -> float:
    """Random batches straight from ``np.load(mmap_mode='r')`` of every shard: the plain reference."""
    manifests = store.manifests["train"]
    maps = [np.load(store.root / m["files"][site]["name"], mmap_mode="r") for m in manifests]
    starts = np.cumsum([0] + [m["rows"] for m in manifests])
    order = np.random.default_rng(seed).permutation(starts[-1])
    t0, n = time.perf_counter(), 0
    for j in range(0, len(order) - batch_size + 1, batch_size):
        rows = np.sort(order[j : j + batch_size])
        shard = np.searchsorted(starts, rows, side="right") - 1
        cut = np.searchsorted(shard, np.arange(len(maps) + 1))
        parts = [maps[s][rows[cut[s] : cut[s + 1]] - starts[s]] for s in range(len(maps)) if cut[s + 1] > cut[s]]
        n += np.concatenate(parts).shape[0]
    return n / (time.perf_counter() - t0)


def training(store, site: str, batch_size: int, steps: int, d_sae: int, work: Path) -> dict:
    """Activations/s of the trainer's step alone and fed by each reader, interleaved step by step.

    One trainer (one ReLU SAE); step k takes its batch in turn from a list already in memory (the step
    alone), from the fast reader and from the previous one; a fed step's time includes waiting for its
    batch. Interleaving at the step keeps the machine's drifts out of the ratios.
    """
    cfg = TrainConfig(
        store=str(store.root),
        out=str(work / "saes"),
        sites=(site,),
        arch=("relu",),
        expansion=d_sae / store.d,
        batch_size=batch_size,
        resample_every=-1,
        device="cpu",
    )
    trainer = Trainer(cfg, progress=False)
    scale = trainer.scales[site]
    kept = list(store.batches(site, batch_size, drop_last=True, seed=1, reader="fast"))[:4]
    trainer.step({site: kept[0] * scale})  # warm-up
    feeds = {
        "step alone": iter(kept * (steps // len(kept) + 1)),
        "fast reader": store.batches(site, batch_size, drop_last=True, seed=2, reader="fast", reuse=True),
        "previous reader": store.batches(site, batch_size, drop_last=True, seed=3, reader="reference"),
    }
    seconds: dict[str, list[float]] = {k: [] for k in feeds}
    for _ in range(steps):
        for name, feed in feeds.items():
            t0 = time.perf_counter()
            trainer.step({site: next(feed) * scale})
            seconds[name].append(time.perf_counter() - t0)
    # the first fed step waits for the reader's first pool: count it, as a training run does once
    return {k: batch_size * len(v) / sum(v) for k, v in seconds.items()} | {"step_seconds": seconds}


def plot(result: dict, path: Path) -> None:
    r = result["rows_per_s"]
    labels = list(r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    colours = ["#1f77b4" if "fast" in k else "#7f7f7f" if "numpy" in k else "#d62728" for k in labels]
    a.barh(labels[::-1], [r[k] / 1e6 for k in labels][::-1], color=colours[::-1])
    for i, k in enumerate(labels[::-1]):
        a.text(r[k] / 1e6, i, f" {r[k] / 1e6:.2f}M", va="center", fontsize=9)
    a.axvline(1.0, color="k", ls="--", lw=1, label="goal: 1M rows/s per site")
    a.set_xlabel("rows/s per site (millions)")
    a.set_title(
        f"reading {result['store']['rows']:,} rows, batch {result['batch_size']}, d = {result['store']['d']} fp16"
    )
    a.legend(loc="lower right", fontsize=9)
    a.set_xlim(0, max(r.values()) / 1e6 * 1.25)
    t = result["training"]
    names = ["step alone", "fast reader", "previous reader"]
    b.bar(names, [t[k] for k in names], color=["#7f7f7f", "#1f77b4", "#d62728"])
    for i, k in enumerate(names):
        b.text(i, t[k], f"{t[k]:.0f}\n({t[k] / t['step alone']:.1%})", ha="center", va="bottom", fontsize=9)
    b.set_ylabel("training activations/s")
    b.set_title(f"ReLU SAE d_sae = {result['training_d_sae']}, {result['machine']['cores']} cores")
    b.set_ylim(0, t["step alone"] * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default="runs/bench/reader-store")
    ap.add_argument("--sites", nargs=2, default=["resid.2", "resid.3"])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=40, help="steps of each kind, interleaved")
    ap.add_argument("--d-sae", type=int, default=8 * 576)
    args = ap.parse_args()
    harvest = [sys.executable, "-m", "circuitsae", "harvest", "--sites", *args.sites, "--tokens", str(args.tokens),
               "--heldout-tokens", "4096", "--out", args.store]  # fmt: skip
    if (
        not (Path(args.store) / "meta.json").is_file()
        or not json.loads((Path(args.store) / "meta.json").read_text())["complete"]
    ):
        subprocess.run(harvest, check=True)
    store = circuitsae.ActivationStore(args.store)
    s1, s2 = args.sites
    bs = args.batch_size
    for _ in store.batches([s1, s2], bs):  # warm the page cache, verify every file once in this process
        pass
    runs = {
        "fast reader (verified before)": lambda: rows_per_s(store.batches(s1, bs, seed=4, reuse=True)),
        "fast reader, fresh tensors": lambda: rows_per_s(store.batches(s1, bs, seed=4)),
        "fast reader, first pass (verifies)": lambda: (
            store_mod._VERIFIED.clear(),
            rows_per_s(store.batches(s1, bs, seed=5, reuse=True)),
        )[1],
        "previous reader (verify on)": lambda: rows_per_s(store.batches(s1, bs, seed=6, reader="reference")),
        "previous reader (verify off)": lambda: rows_per_s(
            store.batches(s1, bs, seed=7, reader="reference", verify=False)
        ),
        "numpy memmap gather (no verify)": lambda: memmap_gather(store, s1, bs, seed=8),
        "fast reader, 2 sites in one read": lambda: rows_per_s(store.batches([s1, s2], bs, seed=9, reuse=True)),
        "fast reader, 2 sites, fresh tensors": lambda: rows_per_s(store.batches([s1, s2], bs, seed=9)),
        "previous reader, 2 sites in one read": lambda: rows_per_s(
            store.batches([s1, s2], bs, seed=10, reader="reference")
        ),
    }
    rounds: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.rounds):
        for name, fn in runs.items():
            rounds[name].append(fn())
            print(f"round {r + 1}: {name}: {rounds[name][-1] / 1e6:.3f}M rows/s", flush=True)
    rps = {k: statistics.median(v) for k, v in rounds.items()}
    with tempfile.TemporaryDirectory() as work:
        train = training(store, s1, bs, args.train_steps, args.d_sae, Path(work))
    print(json.dumps({k: v for k, v in train.items() if k != "step_seconds"}, indent=1), flush=True)
    fast, prev, gather = (
        rps["fast reader (verified before)"],
        rps["previous reader (verify on)"],
        rps["numpy memmap gather (no verify)"],
    )
    two = rps["fast reader, 2 sites in one read"]
    ratios = {
        "fast / previous (verify on)": fast / prev,
        "numpy gather / fast": gather / fast,
        "fast, 2 sites / previous, 2 sites": two / rps["previous reader, 2 sites in one read"],
        "training with fast reader / step alone": train["fast reader"] / train["step alone"],
        "training with previous reader / step alone": train["previous reader"] / train["step alone"],
    }
    goals = {
        "fast reader >= 1M rows/s per site (one site)": fast >= 1e6,
        "fast reader >= 1M rows/s per site (two sites in one read)": two >= 1e6,
        "fast reader >= 4x previous": fast >= 4 * prev,
        "fast reader within 3x of the numpy gather": gather <= 3 * fast,
        "training with the fast reader within 5% of the step alone": train["fast reader"] >= 0.95 * train["step alone"],
    }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "machine": describe(),
        "commit": commit,
        "command": "python benchmarks/reader.py " + shlex.join(sys.argv[1:]),
        "harvest_command": "python -m circuitsae " + shlex.join(harvest[3:]),
        "store": {
            "path": repo_path(args.store),
            "model": store.config["model"],
            "sites": store.sites,
            "rows": store.n_rows("train"),
            "d": store.d,
            "dtype": store.dtype,
            "shards": len(store.manifests["train"]),
            "rows_per_shard": store.manifests["train"][0]["rows"],
        },
        "batch_size": bs,
        "rounds": args.rounds,
        "rows_per_s": rps,
        "rows_per_s_rounds": rounds,
        "training_d_sae": args.d_sae,
        "training_steps_each": args.train_steps,
        "training": train,
        "ratios": ratios,
        "goals": goals,
        "notes": "rows/s per site: a two-site read delivers this many rows of each site per second. Warm page "
        "cache. 'fast reader' rows are read as the trainer reads (reuse=True: two output buffers per site, "
        "reused); 'fresh tensors' allocates every batch anew (what a caller keeping batches gets). The fast "
        "reader's CPU pool gathers rows straight from the memory-mapped shards; on a GPU its pool is a buffer of "
        "slots on the device (not measured here: no GPU).",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reader.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "reader.png")
    print(json.dumps({"rows_per_s": rps, "ratios": ratios, "goals": goals}, indent=2))


if __name__ == "__main__":
    main()
