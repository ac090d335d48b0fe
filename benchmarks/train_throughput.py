"""SAE training throughput: circuitsae vs SAE Lens vs dictionary_learning, one run, same activations.

Settings identical for all (issue 3): d = 576 (SmolLM2's residual width),
d_sae = 8·d = 4608, batch 4096, Adam, float32, 2 torch threads on CPU. The
activations are real SmolLM2 residual activations from a store (the Pareto
benchmark's, else a fresh 40k-token harvest), saved once as a .npy that every
implementation reads. Each implementation runs in its own process (peers in
their own virtual environments, built by ``benchmarks/peers/setup.sh``) and
times its library's own training step; rounds are interleaved and the median
kept. Also measured: the machine's dense fp32 matmul peak (best of a few GEMM
shapes), and each implementation's fraction of it, counting the useful FLOPs
of the SAE maths (standard: 10·B·d·d_sae per step; gated: 14·B·d·d_sae, the
auxiliary decode included).

    bash benchmarks/peers/setup.sh          # once: peer venvs (~5 min)
    python benchmarks/train_throughput.py   # ~10 min on 2 CPU cores
    python benchmarks/train_throughput.py --device cuda   # on a GPU machine (peers need CUDA torch)

Writes ``benchmarks/results/train_throughput.json`` (and ``_cuda`` for GPU) and a PNG.
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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe  # noqa: E402

import circuitsae  # noqa: E402

PEERS = {
    "circuitsae": (Path(sys.executable), HERE / "peers" / "circuitsae_runner.py"),
    "sae-lens": (HERE / ".venv-saelens" / "bin" / "python", HERE / "peers" / "saelens_runner.py"),
    "dictionary_learning": (HERE / ".venv-dictlearn" / "bin" / "python", HERE / "peers" / "dictlearn_runner.py"),
}
FLOPS_PER = {"standard": 10, "gated": 14}  # × B·d·d_sae per step


def matmul_peak(device: str, threads: int) -> dict:
    """Best measured fp32 GEMM FLOP/s over a few shapes (including the SAE's own)."""
    torch.set_num_threads(threads)
    shapes = [(2048, 2048, 2048), (4096, 576, 4608), (4096, 4608, 576), (3072, 3072, 3072)]
    best, per = 0.0, {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        for _ in range(2):
            a @ b
        reps = []
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            reps.append(time.perf_counter() - t)
        flops = 2 * m * k * n / min(reps)
        per[f"{m}x{k}x{n}"] = flops
        best = max(best, flops)
    return {"peak_flops": best, "by_shape": per}


def activations(n_rows: int, path: Path) -> dict:
    """Real SmolLM2 resid.6 activations -> float32 .npy at ``path``."""
    src = Path("runs/bench/pareto-acts")
    if not (src / "meta.json").is_file():
        src = Path("runs/bench/throughput-acts")
        circuitsae.harvest(sites=["resid.6"], tokens=n_rows, out=str(src))
    store = circuitsae.ActivationStore(src)
    x = store.activations("resid.6", "train", max_rows=n_rows).numpy().astype(np.float32)
    np.save(path, x)
    return {"store": str(src), "site": "resid.6", "rows": int(x.shape[0]), "model": store.config["model"]}


def run_one(name: str, arch: str, acts: Path, args: argparse.Namespace, extra: list[str]) -> "dict | None":
    python, script = PEERS[name]
    cmd = [
        str(python),
        str(script),
        "--acts",
        str(acts),
        "--arch",
        arch,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {name} {arch} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--multi", type=int, default=4, help="also time circuitsae training this many SAEs per pass")
    args = ap.parse_args()

    available = [n for n in PEERS if n == "circuitsae" or (PEERS[n][0].parent.parent / ".setup-complete").is_file()]
    missing = sorted(set(PEERS) - set(available))
    if missing:
        print(f"peers not set up (run bash benchmarks/peers/setup.sh): {missing}", file=sys.stderr)
    peak = matmul_peak(args.device, args.threads)
    print(f"matmul peak: {peak['peak_flops'] / 1e9:.1f} GFLOP/s")
    configs = [(n, a, []) for a in ("standard", "gated") for n in available]
    if args.multi > 1:
        configs += [("circuitsae", a, ["--runs", str(args.multi)]) for a in ("standard", "gated")]
    configs += [
        ("circuitsae", a, ["--autograd"]) for a in ("standard", "gated")
    ]  # what the hand-written backward gains
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        acts_path = Path(tmp) / "acts.npy"
        source = activations(4096 * (args.steps + args.warmup), acts_path)
        for r in range(args.rounds):
            for name, arch, extra in configs:
                rec = run_one(name, arch, acts_path, args, extra)
                if rec is None:
                    continue
                key = f"{rec['peer']}|{arch}"
                results.setdefault(key, []).append(rec)
                print(f"round {r + 1}: {rec['peer']:32s} {arch:8s} {rec['acts_per_s']:8.0f} act/s", flush=True)

    table = []
    for key, recs in results.items():
        peer, arch = key.split("|")
        aps = statistics.median(r["acts_per_s"] for r in recs)
        d, d_sae = recs[0]["d"], recs[0]["d_sae"]
        flops = FLOPS_PER[arch] * d * d_sae * aps
        table.append(
            {
                "impl": peer,
                "version": recs[0]["version"],
                "arch": arch,
                "acts_per_s": aps,
                "acts_per_s_rounds": [r["acts_per_s"] for r in recs],
                "useful_flops": flops,
                "fraction_of_matmul_peak": flops / peak["peak_flops"],
                "notes": recs[0]["notes"],
            }
        )
    ratios = {}
    for arch in ("standard", "gated"):
        ours = next((t for t in table if t["impl"] == "circuitsae" and t["arch"] == arch), None)
        plain = next((t for t in table if t["impl"] == "circuitsae (plain autograd)" and t["arch"] == arch), None)
        peers = [t for t in table if t["arch"] == arch and not t["impl"].startswith("circuitsae")]
        if ours and peers:
            best = max(peers, key=lambda t: t["acts_per_s"])
            ratios[arch] = {
                "fastest_peer": best["impl"],
                "circuitsae_over_fastest_peer": ours["acts_per_s"] / best["acts_per_s"],
                "goal_1.5x_met": ours["acts_per_s"] / best["acts_per_s"] >= 1.5,
                "circuitsae_fraction_of_peak": ours["fraction_of_matmul_peak"],
                "goal_50pct_peak_met": ours["fraction_of_matmul_peak"] >= 0.5,
                "fastest_peer_fraction_of_peak": best["fraction_of_matmul_peak"],
                # the most any implementation of the same dense maths could beat that peer by
                "ratio_ceiling_at_100pct_peak": 1 / best["fraction_of_matmul_peak"],
                "hand_written_backward_over_plain_autograd": ours["acts_per_s"] / plain["acts_per_s"]
                if plain
                else None,
            }
    out = {
        "machine": describe(),
        "device": args.device,
        "settings": vars(args) | {"d": 576, "d_sae": 4608, "batch": 4096},
        "activations": source,
        "matmul": peak,
        "results": table,
        "ratios": ratios,
        "peers_missing": missing,
    }
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"train_throughput{suffix}.json").write_text(json.dumps(out, indent=1))
    plot(table, peak, HERE / "results" / f"train_throughput{suffix}.png", out["machine"], args.device)
    print(json.dumps(ratios, indent=1))


def plot(table: list[dict], peak: dict, path: Path, machine: dict, device: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 4))
    names = sorted({t["impl"] for t in table}, key=lambda n: (not n.startswith("circuitsae"), n))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        for j, arch in enumerate(("standard", "gated")):
            t = next((t for t in table if t["impl"] == name and t["arch"] == arch), None)
            if t:
                ax.bar(j + i * width, t["acts_per_s"], width, color=f"C{i}", label=name if j == 0 else None)
                ax.text(
                    j + i * width,
                    t["acts_per_s"],
                    f"{t['fraction_of_matmul_peak']:.0%}\nof peak",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks([0.4 - width / 2, 1.4 - width / 2], ["standard (ReLU/L1) SAE", "Gated SAE"])
    ax.set_ylabel("training activations / s (per SAE)")
    where = machine.get("gpu") if device != "cpu" else f"{machine['cpu']}, {machine['torch_threads']} threads"
    ax.set_title(
        f"SAE training throughput, d=576, d_sae=4608, batch 4096 — {where}\n"
        f"matmul peak {peak['peak_flops'] / 1e9:.0f} GFLOP/s",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
