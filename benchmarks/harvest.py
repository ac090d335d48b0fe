"""Harvest throughput and memory on the real model (SmolLM2-135M), one run.

On the same batches (the contexts ``circuitsae.data.harvest`` itself would use) it
measures tokens/s of

  (a) a plain Hugging Face forward of the whole model (logits included),
  (b) a plain PyTorch forward hook on the site that stops the pass there,
  (c) ``circuitsae.data.harvest`` of that one site, end to end (tokenising the
      corpus, nnsight trace with early stop, float16 store writes, checksums),

for a residual site early, in the middle and late in the model. The configs
are run in interleaved rounds and the median is kept. It also runs the
harvest in fresh processes for two token counts and records each one's peak
resident memory. Goals (issue 2): (c) >= 2x (a) for a site in the first third;
(c) within 10% of (b) everywhere; peak memory independent of the tokens harvested.

    python benchmarks/harvest.py            # ~8 minutes on 2 CPU cores
    python benchmarks/harvest.py --quick    # fewer batches, fewer rounds

Writes ``benchmarks/results/harvest.json`` and ``harvest.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

import circuitsae  # noqa: E402
from circuitsae import data, sites  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CTX, BATCH = 128, 16


class _Stop(Exception):
    pass


def plain_forward(hf, batches):
    with torch.no_grad():
        for ids in batches:
            hf(ids)


def hook_stop(hf, layer, batches):
    got = []

    def hook(module, inputs, output):
        got.append(
            (output[0] if isinstance(output, tuple) else output)[:, 1:].reshape(-1, output.shape[-1]).to(torch.float16)
        )
        raise _Stop

    handle = hf.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    hf(ids)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return got


def circuitsae_harvest(lm, layer, n_ctx, out):
    circuitsae.harvest(
        model=lm,
        sites=[f"resid.{layer}"],
        tokens=n_ctx * (CTX - 1),
        ctx_len=CTX,
        batch_size=BATCH,
        heldout_tokens=0,
        out=out,
        progress=False,
    )


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


PEAK_SNIPPET = """
import os, sys, threading, time, circuitsae
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20
lm = circuitsae.load_model("smollm2-135m", device="cpu")
before, peak, done = rss(), [0.0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.02)
t = threading.Thread(target=sample, daemon=True)
t.start()
circuitsae.harvest(model=lm, sites=["resid.{layer}"], tokens={tokens}, out=sys.argv[1], progress=False, heldout_tokens=0)
done.set()
t.join()
print(before, peak[0])
"""


def peak_memory(layer: int, tokens: int) -> dict:
    """Resident memory sampled every 20 ms while a fresh process harvests ``tokens``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", PEAK_SNIPPET.format(layer=layer, tokens=tokens), f"{tmp}/s"],
            capture_output=True,
            text=True,
            check=True,
        )
    before, peak = map(float, out.stdout.split()[-2:])
    return {
        "tokens": tokens,
        "rss_before_harvest_mib": round(before, 1),
        "peak_rss_during_harvest_mib": round(peak, 1),
        "growth_mib": round(peak - before, 1),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in result["sites"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.27
    xs = range(len(layers))
    ax.bar([x - w for x in xs], [result["plain_forward_tok_s"]] * len(layers), w, label="(a) HF forward, whole model")
    ax.bar(list(xs), [r["hook_stop_tok_s"] for r in result["sites"]], w, label="(b) PyTorch hook, stop at site")
    ax.bar(
        [x + w for x in xs], [r["circuitsae_tok_s"] for r in result["sites"]], w, label="(c) circuitsae.data.harvest"
    )
    for x, r in zip(xs, result["sites"]):
        ax.text(
            x + w,
            r["circuitsae_tok_s"],
            f"{r['c_over_a']:.1f}x a\n{r['c_over_b']:.2f}x b",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(xs), [f"resid.{layer}" for layer in layers])
    ax.set_ylabel("tokens / s")
    ax.set_title(
        f"Harvest throughput, SmolLM2-135M, batch {BATCH}x{CTX}\n{result['machine']['cpu']} ({result['machine']['cores']} cores)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper right")
    ax.set_ylim(0, max(r["circuitsae_tok_s"] for r in result["sites"]) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=4, help="batches of 16x128 tokens per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (median kept)")
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    ap.add_argument("--memory-tokens", type=int, nargs=2, default=[16_256, 130_048])
    ap.add_argument("--quick", action="store_true", help="1 batch, 1 round, small memory runs")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.rounds, args.memory_tokens = 1, 1, [2_032, 8_128]

    lm = circuitsae.load_model("smollm2-135m", device="cpu")
    hf = lm._module
    n_ctx = args.batches * BATCH
    ids = data.contexts(lm.tokenizer, n_ctx, CTX, "mix", "train", seed=0, heldout_fraction=0.05)
    batches = list(ids.split(BATCH))
    tokens = n_ctx * CTX
    assert sites.n_layers(lm) == 30

    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        circuitsae_harvest(lm, 1, BATCH, f"{tmp}/warm")  # warm-up: imports, allocator, tokenizer
        for r in range(args.rounds):
            times.setdefault("a", []).append(timed(lambda: plain_forward(hf, batches)))
            for layer in args.layers:
                times.setdefault(f"b{layer}", []).append(timed(lambda: hook_stop(hf, layer, batches)))
                times.setdefault(f"c{layer}", []).append(
                    timed(lambda: circuitsae_harvest(lm, layer, n_ctx, f"{tmp}/r{r}l{layer}"))
                )
            print(
                f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()), flush=True
            )

    rate = {k: tokens / statistics.median(v) for k, v in times.items()}
    per_site = []
    for layer in args.layers:
        per_site.append(
            {
                "layer": layer,
                "site": f"resid.{layer}",
                "hook_stop_tok_s": round(rate[f"b{layer}"], 1),
                "circuitsae_tok_s": round(rate[f"c{layer}"], 1),
                "c_over_a": round(rate[f"c{layer}"] / rate["a"], 3),
                "c_over_b": round(rate[f"c{layer}"] / rate[f"b{layer}"], 3),
            }
        )
    memory = [peak_memory(args.layers[0], n) for n in args.memory_tokens]
    first_third = [s for s in per_site if s["layer"] < 10]
    result = {
        "benchmark": "harvest",
        "command": "python benchmarks/harvest.py" + (" --quick" if args.quick else ""),
        "machine": describe(),
        "model": "smollm2-135m",
        "corpus": "mix",
        "batch": [BATCH, CTX],
        "tokens_per_measurement": tokens,
        "rounds": args.rounds,
        "seconds": times,
        "plain_forward_tok_s": round(rate["a"], 1),
        "sites": per_site,
        "peak_memory": memory,
        "goals": {
            "c_ge_2x_a_first_third": all(s["c_over_a"] >= 2 for s in first_third),
            "c_within_10pct_of_b": all(s["c_over_b"] >= 0.9 for s in per_site),
            "peak_rss_growth_from_more_tokens_mib": round(
                memory[1]["peak_rss_during_harvest_mib"] - memory[0]["peak_rss_during_harvest_mib"], 1
            ),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "harvest.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "harvest.png")
    print(json.dumps({k: result[k] for k in ("plain_forward_tok_s", "sites", "peak_memory", "goals")}, indent=2))


if __name__ == "__main__":
    main()
