"""Training at every layer from forward passes: circuitsae against sparsify, and circuitsae from the model against
circuitsae from a store, on the same tokens of SmolLM2-135M.

    python benchmarks/stream_throughput.py            # ~20 min on 2 CPU cores (sparsify venv: peers/setup.sh)

The work: a TopK SAE (k 32, 1,152 latents) on the residual output of each of SmolLM2's 30 layers, one pass over
the same 520 training contexts of 128 tokens (position 0, the start token, left out: 66,040 rows per site),
batches of 1,016 rows (8 contexts), Adam with lr 1e-3, on this CPU with 2 threads, one library at a time:

* **sparsify** 1.3.3, its own ``Trainer.fit()`` (``benchmarks/peers/sparsify_runner.py``): every forward pass
  trains every layer's SAE on that batch, in file order; ``--exclude-tokens`` drops the start token; AuxK weight
  1/32 (its dead threshold, 10M tokens, is longer than the run); its lr schedule is forced (1% warm-up, linear
  decay to 0).
* **circuitsae from the model**: ``circuitsae.train(model=..., sites=("resid.*",), ...)`` in one process: the
  input-scale sample (16,384 rows of extra forward passes), the shuffle buffer (32,768 rows per site), training,
  a small held-out evaluation, saving. Timed from the call to its return; the model's loading is not timed (nor
  is sparsify's).
* **circuitsae from a store**: ``harvest`` of the same 30 sites and contexts into a store, then ``train`` from it:
  each timed; their sum is what the store path costs for this work.

Each side runs in its own process. The final FVU and L0 of every SAE are measured afterwards by the same code
(:func:`circuitsae.training.evaluate.reconstruction`) on the same 8,192 held-out rows per site (forward passes
over the held-out split), sparsify's SAEs read with :func:`circuitsae.load_dictionary`.

Writes ``benchmarks/results/stream_throughput.json`` (the machine named, the ratios from this one run) and
``stream_throughput.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe, repo_path  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SPARSIFY_PY = ROOT / "benchmarks" / ".venv-sparsify" / "bin" / "python"
CTX = 128


def parse_args(argv: "list[str] | None" = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, default=520, help="training contexts (a multiple of --batch-seqs)")
    ap.add_argument("--batch-seqs", type=int, default=8)
    ap.add_argument("--num-latents", type=int, default=1152)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--heldout-rows", type=int, default=8192)
    ap.add_argument("--work", default="runs/bench/stream_throughput")
    ap.add_argument("--side", choices=("circuitsae", "store"), help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="+", default=["sparsify", "circuitsae", "store"], help="sides to (re)run")
    return ap.parse_args(argv)


def _train_kwargs(args: argparse.Namespace) -> dict:
    return {
        "sites": ("resid.*",),
        "arch": ("topk",),
        "coefficients": (args.k,),
        "expansion": args.num_latents / 576,
        "batch_size": args.batch_seqs * (CTX - 1),
        "lr": args.lr,
        "eval_rows": 1016,
        "device": "cpu",
    }


def side_circuitsae(args: argparse.Namespace) -> dict:
    import circuitsae

    work = ROOT / args.work
    model = circuitsae.load_model("smollm2-135m", device="cpu")
    t0 = time.perf_counter()
    circuitsae.train(
        model=model,
        tokens=args.contexts * (CTX - 1),
        ctx_len=CTX,
        chunk_contexts=64,
        buffer_rows=1 << 15,
        out=str(work / "circuitsae"),
        progress=False,
        **_train_kwargs(args),
    )
    return {"seconds": time.perf_counter() - t0}


def side_store(args: argparse.Namespace) -> dict:
    import circuitsae

    work = ROOT / args.work
    model = circuitsae.load_model("smollm2-135m", device="cpu")
    t0 = time.perf_counter()
    circuitsae.harvest(
        model=model, sites=("resid.*",), tokens=args.contexts * (CTX - 1), ctx_len=CTX, out=str(work / "store"),
        heldout_tokens=0, shard_contexts=64, progress=False,
    )  # fmt: skip
    t1 = time.perf_counter()
    circuitsae.train(store=str(work / "store"), out=str(work / "from_store"), progress=False, **_train_kwargs(args))
    return {"harvest_seconds": t1 - t0, "train_seconds": time.perf_counter() - t1}


def _side(args: argparse.Namespace, name: str) -> dict:
    # a fresh start: what an earlier run left would be resumed (or found finished) and its time not measured
    for folder in {"circuitsae": ("circuitsae",), "store": ("store", "from_store")}[name]:
        shutil.rmtree(ROOT / args.work / folder, ignore_errors=True)
    cmd = [sys.executable, __file__, "--side", name, *sys.argv[1:]]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the {name} side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_sparsify(args: argparse.Namespace, tokens: Path, bos: int) -> dict:
    from circuitsae.models import smollm2_folder

    if not (SPARSIFY_PY.parent.parent / ".setup-complete").is_file():
        raise SystemExit("the sparsify venv is not built: bash benchmarks/peers/setup.sh")
    cmd = [
        str(SPARSIFY_PY), str(ROOT / "benchmarks" / "peers" / "sparsify_runner.py"), "--model-dir",
        str(smollm2_folder()), "--tokens", str(tokens), "--num-latents", str(args.num_latents), "--k", str(args.k),
        "--batch-seqs", str(args.batch_seqs), "--lr", str(args.lr), "--auxk-alpha", str(1 / 32),
        "--exclude-tokens", str(bos), "--threads", "2", "--out", str(ROOT / args.work / "sparsify"),
        "--renorm-decoder",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"sparsify failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def evaluate_all(args: argparse.Namespace) -> dict:
    import torch

    import circuitsae
    from circuitsae.data.stream import ModelStream
    from circuitsae.training.evaluate import reconstruction

    work = ROOT / args.work
    model = circuitsae.load_model("smollm2-135m", device="cpu")
    sites = [f"resid.{i}" for i in range(30)]
    held = ModelStream(model, sites, tokens=0, ctx_len=CTX, heldout_rows=args.heldout_rows).sample(
        sites, "heldout", args.heldout_rows
    )
    name = f"topk-c{args.k}"
    folders = {
        "sparsify": lambda i: work / "sparsify" / "run" / f"layers.{i}",
        "circuitsae": lambda i: work / "circuitsae" / f"resid.{i}-{name}",
        "store": lambda i: work / "from_store" / f"resid.{i}-{name}",
    }
    out: dict = {}
    for side, folder in folders.items():
        rows = []
        for i, site in enumerate(sites):
            if not folder(i).is_dir():
                break
            m = reconstruction(circuitsae.load_dictionary(folder(i)), held[site].to(torch.float32))
            rows.append({"site": site, "fvu": m["fvu"], "l0": m["l0"], "dead_fraction": m["dead_fraction"]})
        if rows:
            out[side] = rows
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1, 1.6]})
    labels = ["sparsify 1.3.3\n(from the model)", "circuitsae\nfrom the model", "circuitsae\nharvest + store"]
    speeds = [result["tokens_per_s"][k] for k in ("sparsify", "circuitsae", "store")]
    bars = a.bar(labels, speeds, color=["tab:grey", "tab:blue", "tab:cyan"])
    for bar, v in zip(bars, speeds):
        a.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=9)
    a.set_ylabel("training tokens per second (whole training)")
    a.set_title(f"30 TopK SAEs, SmolLM2 resid.0-29: circuitsae / sparsify = {result['ratio']:.2f}x", fontsize=10)
    for side, colour in (("sparsify", "tab:grey"), ("circuitsae", "tab:blue"), ("store", "tab:cyan")):
        rows = result["fvu"].get(side, [])
        b.plot([int(r["site"].split(".")[1]) for r in rows], [r["fvu"] for r in rows], marker="o", ms=3,
               color=colour, label=side)  # fmt: skip
    b.set_xlabel("layer (resid.L)")
    b.set_ylabel(f"held-out FVU ({result['settings']['heldout_rows']} rows per site)")
    b.set_title("final FVU per layer, same held-out rows, same code", fontsize=10)
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    m = result["machine"]
    fig.text(0.01, 0.01, f"{m['cpu']}, {m['cores']} cores; {result['settings']['tokens']} training tokens per "
             f"site, k {result['settings']['k']}, {result['settings']['num_latents']} latents", fontsize=8)  # fmt: skip
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    args = parse_args()
    if args.side:
        print(json.dumps(side_circuitsae(args) if args.side == "circuitsae" else side_store(args)))
        return
    import numpy as np

    import circuitsae
    from circuitsae.data import corpora
    from circuitsae.models import start_token_id

    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "stream_throughput.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    tok = circuitsae.load_model("smollm2-135m", device="cpu").tokenizer
    ids = corpora.contexts(tok, args.contexts, CTX, corpora.DEFAULT_CORPUS, "train", 0)
    tokens = work / "tokens.npy"
    np.save(tokens, ids.numpy().astype(np.int64))
    rows = args.contexts * (CTX - 1)
    sides = result.get("sides", {})
    if "sparsify" in args.only:
        sides["sparsify"] = run_sparsify(args, tokens, start_token_id(tok))
        sides["sparsify"]["out"] = repo_path(Path(sides["sparsify"].get("out", work / "sparsify")))
        print("sparsify:", sides["sparsify"]["seconds"], "s", flush=True)
    if "circuitsae" in args.only:
        sides["circuitsae"] = _side(args, "circuitsae")
        print("circuitsae:", sides["circuitsae"], flush=True)
    if "store" in args.only:
        sides["store"] = _side(args, "store")
        print("store:", sides["store"], flush=True)
    speeds = {
        "sparsify": rows / sides["sparsify"]["seconds"],
        "circuitsae": rows / sides["circuitsae"]["seconds"],
        "store": rows / (sides["store"]["harvest_seconds"] + sides["store"]["train_seconds"]),
    }
    fvu = evaluate_all(args)
    mean = {side: sum(r["fvu"] for r in v) / len(v) for side, v in fvu.items()}
    result = {
        "benchmark": "stream_throughput",
        "command": "python benchmarks/stream_throughput.py " + " ".join(sys.argv[1:]),
        "machine": describe(),
        "settings": {
            "model": "smollm2-135m",
            "sites": "resid.0-29",
            "contexts": args.contexts,
            "ctx_len": CTX,
            "tokens": rows,
            "batch_rows": args.batch_seqs * (CTX - 1),
            "num_latents": args.num_latents,
            "k": args.k,
            "lr": args.lr,
            "heldout_rows": args.heldout_rows,
            "threads": 2,
        },  # fmt: skip
        "sides": sides,
        "tokens_per_s": speeds,
        "ratio": speeds["circuitsae"] / speeds["sparsify"],
        "store_over_model": speeds["store"] / speeds["circuitsae"],
        "mean_fvu": mean,
        "fvu_relative_to_sparsify": mean["circuitsae"] / mean["sparsify"] - 1 if "sparsify" in mean else None,
        "goal": {
            "tokens_per_s_ratio_ge_1.5": speeds["circuitsae"] / speeds["sparsify"] >= 1.5,
            "fvu_no_worse_than_5pct": mean.get("circuitsae", 1e9) <= 1.05 * mean.get("sparsify", 0),
        },
        "fvu": fvu,
    }
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / "stream_throughput.png")
    print(f"wrote {repo_path(path)}: ratio {result['ratio']:.2f}, mean FVU {mean}")


if __name__ == "__main__":
    main()
