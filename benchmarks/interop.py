"""Interop with the real peers: the same codes on real SmolLM2 activations, both ways (issue 15, part 4).

Peer → circuitsae. In its own virtual environment (``benchmarks/peers/setup.sh``) each peer builds an
SAE of every architecture it has and circuitsae reads, with its own classes, trains it briefly with its
own training code (``--steps`` steps of batch 512; dictionary_learning's TopK trainers one step, see its
runner), gives it random but realistic biases, thresholds and decoder norms (so that about 5%
of codes fire and decoder norms vary), saves it with its own save code, and writes its own
``encode(x)`` and ``decode(encode(x))`` on held-out rows (runners ``benchmarks/peers/interop_*.py``; their
docstrings say exactly what is built and how):

  SAE Lens 6.54          standard, gated, jumprelu (apply_b_dec_to_input true and false), topk, and a
                         BatchTopK training SAE saved for inference (as jumprelu)
  dictionary_learning    AutoEncoder, GatedAutoEncoder, AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder,
                         MatryoshkaBatchTopKSAE; each as trainSAE saved it and with randomised settings
  sparsify               SparseCoder (TopK)

circuitsae reads each folder with ``load_dictionary`` and encodes the same rows. Where it folds the
decoder norms into the encoder (``meta["codes_scaled_by_decoder_norm"]``: code i is the file's code i
times ‖W_dec,i‖), its codes are divided by the file's norms before the comparison.

circuitsae → SAE Lens. circuitsae builds each of its dictionaries with random but realistic weights (and
the Pareto benchmark's trained ReLU and Gated SAEs when ``runs/bench/pareto`` holds them), saves it with
``save(path, format="saelens")``, and SAE Lens loads it with ``SAE.load_from_disk`` and encodes the same
rows. dictionary_learning and sparsify read only their own formats, and circuitsae writes only its own
and SAE Lens's, so this direction is SAE Lens only.

Compared, in float64, per (peer, direction, architecture): the largest per-row relative error
‖a − b‖/‖b‖ of codes and of reconstructions over the rows (rows where the peer's codes are all zero must
be all zero here too), the whole-array relative error, the largest absolute error, and the number of
codes that are zero on one side only. Pass: both largest per-row relative errors ≤ 1e-5.

Two yardsticks for a case that does not pass, both on the same rows: ``float64_reference`` compares each
side's float32 codes with the peer's (peer → circuitsae) or circuitsae's (circuitsae → SAE Lens) own
maths run in float64, which says which side a disagreement comes from; ``peer_own_fold`` (SAE Lens and
dictionary_learning's AutoEncoder) is the peer's own fold of the decoder norms (``fold_W_dec_norm``,
``normalize_decoder``), which is what circuitsae does on reading. ``at_float32_floor``: the side under
test (circuitsae reading a peer's file; SAE Lens reading circuitsae's) is within 1e-5, or within 1.01×
the other side's float32 error (or the peer's own fold's), of the float64 reference in both codes and
reconstructions. It explains a failure; it does not turn it into a pass.

    bash benchmarks/peers/setup.sh     # once: the peer venvs (~7 min)
    python benchmarks/interop.py       # ~5.5 min on 2 busy CPU cores (wall time in the JSON)

Writes ``benchmarks/results/interop.json``; scratch (the SAE folders, codes) under ``runs/bench/interop/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import ROOT, describe, repo_path  # noqa: E402

sys.path.insert(0, str(HERE / "peers"))
from _interop_common import encode_decode, quantile_per_feature  # noqa: E402

import circuitsae  # noqa: E402
from circuitsae.dictionaries import (  # noqa: E402
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    ReluSAE,
    TopKSAE,
    load_dictionary,
)

TOL = 1e-5
PEERS = {  # name -> (venv, runner)
    "sae-lens": (HERE / ".venv-saelens", HERE / "peers" / "interop_saelens.py"),
    "dictionary_learning": (HERE / ".venv-dictlearn", HERE / "peers" / "interop_dictlearn.py"),
    "sparsify": (HERE / ".venv-sparsify", HERE / "peers" / "interop_sparsify.py"),
}
PARETO = ROOT / "runs" / "bench" / "pareto"  # trained circuitsae SAEs of the same site, used when present


# -- activations ---------------------------------------------------------------------------------------------
def activations(work: Path, n_rows: int, n_fit: int) -> dict:
    """Held-out rows (compared) and train rows (training and the random settings) of SmolLM2's resid.6."""
    src = ROOT / "runs" / "bench" / "pareto-acts"
    if not (src / "meta.json").is_file():
        src = ROOT / "runs" / "bench" / "interop-acts"
        if not (src / "meta.json").is_file():
            print(f"no store at runs/bench/pareto-acts: harvesting 20000 tokens into {repo_path(src)}", flush=True)
            circuitsae.harvest(sites=["resid.6"], tokens=20000, out=str(src))
    store = circuitsae.ActivationStore(src)
    x = store.activations("resid.6", "heldout", max_rows=n_rows).numpy().astype(np.float32)
    fit = store.activations("resid.6", "train", max_rows=n_fit).numpy().astype(np.float32)
    np.save(work / "acts.npy", x)
    np.save(work / "fit.npy", fit)
    return {
        "store": repo_path(src),
        "model": store.config.get("model"),
        "site": "resid.6",
        "context_size": store.config.get("ctx_len"),
        "rows_compared": int(x.shape[0]),
        "rows_compared_split": "heldout",
        "rows_fit": int(fit.shape[0]),
        "rows_fit_split": "train",
        "mean_row_norm": float(np.linalg.norm(x, axis=1).mean()),
    }


# -- peers -------------------------------------------------------------------------------------------------
def peer_ready(name: str) -> "str | None":
    """None when the peer's venv is complete, else why not."""
    venv = PEERS[name][0]
    if (venv / ".setup-complete").is_file() and (venv / "bin" / "python").is_file():
        return None
    if (venv / ".setup-failed").is_file():
        return f"{repo_path(venv)} failed to set up (see bash benchmarks/peers/setup.sh)"
    return f"{repo_path(venv)} is not set up: run bash benchmarks/peers/setup.sh"


def run_peer(name: str, args: list[str], log: Path) -> dict:
    """Run a peer runner in its venv (cwd: the repository); its stderr goes to ``log``; returns its JSON line."""
    venv, script = PEERS[name]
    cmd = [str(venv / "bin" / "python"), str(script.relative_to(ROOT)), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    log.write_text(proc.stderr)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"{name} runner failed (exit {proc.returncode}; log {repo_path(log)}): {' | '.join(tail)}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


# -- comparison ----------------------------------------------------------------------------------------------
def errors(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Per-row and whole-array errors of ``ours`` against ``theirs`` (float64)."""
    a, b = ours.double(), theirs.double()
    diff = a - b
    bn, dn = b.norm(dim=1), diff.norm(dim=1)
    nz = bn > 0
    return {
        "max_rel": float((dn[nz] / bn[nz]).max()) if bool(nz.any()) else 0.0,
        "rel": float(diff.norm() / b.norm()) if float(b.norm()) > 0 else float(diff.norm()),
        "max_abs": float(diff.abs().max()),
        "zero_rows_not_zero": int(((~nz) & (dn > 0)).sum()),
    }


def vs_reference(codes: torch.Tensor, recon: torch.Tensor, ref: tuple) -> dict:
    """One side's float32 codes and reconstructions against the float64 reference ``ref = (codes, recon)``."""
    return {
        "codes_max_rel": errors(codes, ref[0])["max_rel"],
        "recon_max_rel": errors(recon, ref[1])["max_rel"],
        "support_mismatches": int(((codes != 0) != (ref[0].double() != 0)).sum()),
    }


def at_float32_floor(subject: "dict | None", yardsticks: list) -> "bool | None":
    """Is ``subject`` (a :func:`vs_reference` dict) as close to float64 as one of the yardsticks (or within TOL)?

    A case that fails the strict comparison but is at the floor disagrees with the peer only where float32
    itself cannot tell (a pre-activation within a few ulps of a threshold, a gate or a TopK boundary, or a
    row whose codes are all cancellation-sized): the peer's own float32 maths is as far from exact.
    """
    if subject is None:
        return None

    def within(y: "dict | None") -> bool:
        slack = {k: max(TOL, 1.01 * y[k]) if y else TOL for k in ("codes_max_rel", "recon_max_rel")}
        return all(subject[k] <= slack[k] for k in slack)

    return any(within(y) for y in [None, *[y for y in yardsticks if y]])


def verdict(codes_err: dict, recon_err: dict) -> bool:
    return (
        codes_err["max_rel"] <= TOL
        and recon_err["max_rel"] <= TOL
        and codes_err["zero_rows_not_zero"] == 0
        and recon_err["zero_rows_not_zero"] == 0
    )


def compare_into_circuitsae(peer: str, case: dict, case_dir: Path, x: torch.Tensor) -> dict:
    """load_dictionary the peer's folder; compare with the peer's own codes and reconstructions."""
    folder = case_dir / case.get("folder", "sae")
    theirs_codes = torch.from_numpy(np.load(case_dir / "codes.npy"))
    theirs_recon = torch.from_numpy(np.load(case_dir / "recon.npy"))
    norms = torch.from_numpy(np.load(case_dir / "decoder_norms.npy")).double()
    row = {"peer": peer, "direction": f"{peer} -> circuitsae", "architecture": case["architecture"]}
    try:
        dictionary = load_dictionary(folder)
    except circuitsae.CircuitSAEError as e:
        return row | {"folder": repo_path(folder), "pass": False, "error": str(e)}
    codes, recon = encode_decode(dictionary, x)
    scaled = dictionary.meta.get("codes_scaled_by_decoder_norm")
    compared = codes.double() / norms if scaled else codes.double()
    ce, re_ = errors(compared, theirs_codes), errors(recon, theirs_recon)
    support = int(((compared != 0) != (theirs_codes != 0)).sum())
    ref = None
    if (case_dir / "codes_f64.npy").is_file():  # the peer's own maths in float64
        ref = (
            torch.from_numpy(np.load(case_dir / "codes_f64.npy")),
            torch.from_numpy(np.load(case_dir / "recon_f64.npy")),
        )
    f64 = (
        {"circuitsae": vs_reference(compared, recon, ref), "peer": vs_reference(theirs_codes, theirs_recon, ref)}
        if ref
        else None
    )
    peer_fold = None
    if scaled and (case_dir / "codes_peer_folded.npy").is_file():  # the peer's own fold, on the same rows
        fc = torch.from_numpy(np.load(case_dir / "codes_peer_folded.npy")).double() / norms
        fr = torch.from_numpy(np.load(case_dir / "recon_peer_folded.npy"))
        peer_fold = {
            "codes_vs_peer": errors(fc, theirs_codes),
            "vs_float64": vs_reference(fc, fr, ref) if ref else None,
        }
    row |= {
        "folder": repo_path(folder),
        "loaded_as": type(dictionary).__name__,
        "site": dictionary.meta.get("site"),
        "rows": int(x.shape[0]),
        "d_sae": int(dictionary.d_dict),
        "fraction_nonzero": float((theirs_codes != 0).double().mean()),
        "l0": float((theirs_codes != 0).double().sum(1).mean()),
        "codes_compared": "circuitsae codes / the file's decoder-row norms (codes_scaled_by_decoder_norm)"
        if scaled
        else "circuitsae codes as they are",
        "file_decoder_norms": [float(norms.min()), float(norms.max())],
        "codes": ce,
        "recon": re_,
        "support_mismatches": support,
        "float64_reference": f64,
        "peer_own_fold": peer_fold,
        "pass": verdict(ce, re_),
        "at_float32_floor": at_float32_floor(
            f64 and f64["circuitsae"], [f64 and f64["peer"], peer_fold and peer_fold["vs_float64"]]
        ),
        "peer_notes": {k: v for k, v in case.items() if k not in ("architecture", "folder")},
    }
    return row


# -- circuitsae's own dictionaries, random but realistic ----------------------------------------------------
@torch.no_grad()
def circuitsae_dictionaries(fit: torch.Tensor, d_sae: int, k: int, seed: int, meta: dict) -> list[tuple]:
    """(name, dictionary, SAE Lens architecture, how it was made) for every kind circuitsae writes to SAE Lens.

    Random but realistic (seeded): the constructor's unit decoder rows; encoder rows = 0.5·decoder rows +
    noise of the same size (untied, not symmetric); b_dec = the fit rows' mean + 0.1·std·N(0,1); feature i
    fires on a fraction 1 − q_i, q_i ~ U(0.90, 0.995), of the fit rows (relu: b_enc; gated: b_gate, with
    r_mag ~ 0.3·N(0,1), b_mag random; jumprelu: θ, with b_enc random); topk/batchtopk: b_enc random, k, and
    BatchTopK's θ = the mean over fit batches of the smallest kept value (what its training averages).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    d = fit.shape[1]

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    def common(sae, enc: torch.Tensor) -> torch.Tensor:
        sae.b_dec.copy_(fit.mean(0) + 0.1 * fit.std(0) * randn(d))
        enc.copy_(0.5 * sae.W_dec + 0.5 * randn(d_sae, d) / math.sqrt(d))
        return (fit - sae.b_dec) @ enc.T

    def q():
        return 0.90 + 0.095 * torch.rand(d_sae, generator=g)

    how = "random but realistic (interop.circuitsae_dictionaries)"
    relu = ReluSAE(d, d_sae, tied=False, decoder_bias=True)
    pre = common(relu, relu.W_enc_untied)
    relu.b_enc.copy_(-quantile_per_feature(pre, q()))

    gated = GatedSAE(d, d_sae)
    proj = common(gated, gated.W_gate)
    gated.r_mag.copy_(0.3 * randn(d_sae))
    gated.b_gate.copy_(-quantile_per_feature(proj, q()))
    gated.b_mag.copy_(0.2 * (proj * gated.r_mag.exp()).std(0) * randn(d_sae))

    topk = TopKSAE(d, d_sae, k)
    pre = common(topk, topk.W_enc)
    topk.b_enc.copy_(0.2 * pre.std(0) * randn(d_sae))

    btk = BatchTopKSAE(d, d_sae, k)
    pre = common(btk, btk.W_enc)
    btk.b_enc.copy_(0.2 * pre.std(0) * randn(d_sae))
    stats = [btk._select(btk.pre_activation(fit[s : s + 512]))[1] for s in range(0, fit.shape[0] - 511, 512)]
    btk.threshold.copy_(torch.stack(stats).mean())
    btk.threshold_steps.fill_(len(stats))

    jr = JumpReLUSAE(d, d_sae)
    pre = common(jr, jr.W_enc)
    jr.b_enc.copy_(0.2 * pre.std(0) * randn(d_sae))
    jr.log_threshold.copy_(quantile_per_feature(pre + jr.b_enc, q()).clamp_min(1e-3).log())

    for sae in (relu, gated, topk, btk, jr):
        sae.meta = dict(meta)
    cases = [
        ("relu", relu, "standard", how),
        ("gated", gated, "gated", how),
        ("gated-as-jumprelu", gated, "jumprelu", how),
        ("topk", topk, "topk", how),
        ("batchtopk-as-jumprelu", btk, "jumprelu", how),
        ("jumprelu", jr, "jumprelu", how),
    ]
    for arch, names in (("relu", ("standard",)), ("gated", ("gated", "jumprelu"))):
        trained = PARETO / f"resid.6-{arch}-c2"
        if (trained / "cfg.json").is_file():
            sae = load_dictionary(trained)
            for name in names:
                label = f"{arch}-trained" + ("-as-jumprelu" if name == "jumprelu" else "")
                cases.append((label, sae, name, f"trained by benchmarks/pareto.py ({repo_path(trained)})"))
    return cases


# -- main ------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048, help="held-out rows compared")
    ap.add_argument("--fit-rows", type=int, default=8192, help="train rows for the peers' training and settings")
    ap.add_argument("--d-sae", type=int, default=2304, help="dictionary size (4·d)")
    ap.add_argument("--k", type=int, default=32, help="k of the TopK/BatchTopK SAEs")
    ap.add_argument("--steps", type=int, default=20, help="training steps each peer runs (batch 512)")
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/bench/interop", help="scratch folder (emptied first)")
    ap.add_argument("--out", default=str(HERE / "results" / "interop.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    work = Path(args.work).resolve()
    for sub in ("peers", "circuitsae-to-saelens"):
        shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    source = activations(work, args.rows, args.fit_rows)
    x = torch.from_numpy(np.load(work / "acts.npy"))
    fit = torch.from_numpy(np.load(work / "fit.npy"))
    print(
        f"activations: {source['rows_compared']} held-out rows, {source['rows_fit']} train rows from {source['store']}"
    )

    missing = {name: why for name in args.peers if (why := peer_ready(name))}
    for name, why in missing.items():
        print(f"peer {name} skipped: {why}", file=sys.stderr)
    available = [n for n in args.peers if n not in missing]
    common = ["--acts", str(work / "acts.npy"), "--fit", str(work / "fit.npy"), "--threads", str(args.threads)]
    sizes = ["--d-sae", str(args.d_sae), "--k", str(args.k), "--steps", str(args.steps), "--seed", str(args.seed)]
    peers: dict[str, dict] = {n: {"status": "missing", "why": w} for n, w in missing.items()}
    results: list[dict] = []

    # peer -> circuitsae
    for name in available:
        out = work / "peers" / name
        out.mkdir(parents=True, exist_ok=True)
        print(f"{name}: building, training and saving with the peer's own code ...", flush=True)
        try:
            record = run_peer(name, ["export", *common, *sizes, "--out", str(out)], work / f"{name}-export.log")
        except RuntimeError as e:
            print(f"  {e}", file=sys.stderr)
            peers[name] = {"status": "failed", "why": str(e)}
            continue
        peers[name] = {"status": "ok", "version": record["version"], "torch": record["torch"]}
        peers[name]["export"] = {
            k: record[k] for k in ("d", "d_sae", "steps", "topk_steps", "batch", "lr", "seconds") if k in record
        }
        for case in record["cases"]:
            row = compare_into_circuitsae(name, case, out / case["architecture"], x)
            results.append(row)
            print(report_line(row), flush=True)

    # circuitsae -> SAE Lens
    if "sae-lens" in available and peers["sae-lens"]["status"] == "ok":
        base = work / "circuitsae-to-saelens"
        meta = {"model": source["model"], "site": "resid.6", "context_size": source["context_size"]}
        dirs = []
        print("circuitsae -> sae-lens: saving circuitsae's dictionaries with save(format='saelens') ...", flush=True)
        for name, sae, arch, how in circuitsae_dictionaries(fit, args.d_sae, args.k, args.seed, meta):
            folder = base / name
            sae.save(folder / "sae", format="saelens", architecture=arch)
            codes, recon = encode_decode(sae, x)
            np.save(folder / "codes.npy", codes.numpy())
            np.save(folder / "recon.npy", recon.numpy())
            c64, r64 = encode_decode(copy.deepcopy(sae).double(), x.double())  # the same maths in float64
            np.save(folder / "codes_f64.npy", c64.numpy())
            np.save(folder / "recon_f64.npy", r64.numpy())
            (folder / "case.json").write_text(json.dumps({"class": type(sae).__name__, "saved_as": arch, "how": how}))
            dirs.append(folder)
        try:
            record = run_peer(
                "sae-lens",
                ["load", "--acts", str(work / "acts.npy"), "--threads", str(args.threads), "--dirs", *map(str, dirs)],
                work / "sae-lens-load.log",
            )
        except RuntimeError as e:
            print(f"  {e}", file=sys.stderr)
            peers["sae-lens"]["load"] = {"status": "failed", "why": str(e)}
            record = {"cases": []}
        loaded = {c["dir"]: c for c in record["cases"]}
        for folder in dirs:
            case = json.loads((folder / "case.json").read_text())
            row = {"peer": "sae-lens", "direction": "circuitsae -> sae-lens", "architecture": folder.name}
            if folder.name not in loaded:
                results.append(row | {"pass": False, "error": "SAE Lens did not load it (see the load log)"})
                continue
            ours_codes = torch.from_numpy(np.load(folder / "codes.npy"))
            ours_recon = torch.from_numpy(np.load(folder / "recon.npy"))
            theirs_codes = torch.from_numpy(np.load(folder / "peer_codes.npy"))
            theirs_recon = torch.from_numpy(np.load(folder / "peer_recon.npy"))
            ce, re_ = errors(ours_codes, theirs_codes), errors(ours_recon, theirs_recon)
            ref = (
                torch.from_numpy(np.load(folder / "codes_f64.npy")),
                torch.from_numpy(np.load(folder / "recon_f64.npy")),
            )
            f64 = {  # reference: circuitsae's own maths in float64
                "circuitsae": vs_reference(ours_codes, ours_recon, ref),
                "peer": vs_reference(theirs_codes, theirs_recon, ref),
            }
            back, _ = encode_decode(load_dictionary(folder / "sae"), x)  # and circuitsae reads its own folder
            row |= {
                "folder": repo_path(folder / "sae"),
                "circuitsae_class": case["class"],
                "saved_as": case["saved_as"],
                "made": case["how"],
                "loaded_as": loaded[folder.name]["loaded_class"],
                "rows": int(x.shape[0]),
                "d_sae": int(ours_codes.shape[1]),
                "fraction_nonzero": float((theirs_codes != 0).double().mean()),
                "l0": float((theirs_codes != 0).double().sum(1).mean()),
                "codes_compared": "circuitsae's own codes (unit decoder rows: nothing to scale)",
                "codes": ce,
                "recon": re_,
                "support_mismatches": int(((ours_codes != 0) != (theirs_codes != 0)).sum()),
                "float64_reference": f64,
                "circuitsae_reloaded_codes_max_rel": errors(back, ours_codes)["max_rel"],
                "pass": verdict(ce, re_),
                "at_float32_floor": at_float32_floor(f64["peer"], [f64["circuitsae"]]),
            }
            results.append(row)
            print(report_line(row), flush=True)

    wall = time.perf_counter() - t_start
    out = {
        "benchmark": "interop",
        "command": " ".join(["python benchmarks/interop.py", *sys.argv[1:]]),
        "machine": describe(),
        "wall_seconds": round(wall, 1),
        "tolerance": TOL,
        "pass_criterion": "largest per-row relative error ||a-b||/||b|| of codes and of reconstructions <= 1e-5 "
        "(rows whose peer codes are all zero must be all zero here too)",
        "activations": source,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")} | {"work": repo_path(work)},
        "peers": peers,
        "not_compared": {
            "circuitsae -> dictionary_learning": "dictionary_learning 0.1.0 reads only its own ae.pt; circuitsae "
            "writes circuitsae and SAE Lens folders",
            "circuitsae -> sparsify": "sparsify reads only its own folders; circuitsae does not write them",
        },
        "results": results,
        "summary": {
            "compared": len(results),
            "passed": sum(bool(r.get("pass")) for r in results),
            "failed": [f"{r['direction']}: {r['architecture']}" for r in results if not r.get("pass")],
            "failed_but_at_float32_floor": [
                f"{r['direction']}: {r['architecture']}"
                for r in results
                if not r.get("pass") and r.get("at_float32_floor")
            ],
        },
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    s = out["summary"]
    print(f"{s['passed']}/{s['compared']} pass (<= {TOL:g}); wall {wall:.0f} s -> {repo_path(path)}")
    if s["failed"]:
        print("failed: " + "; ".join(s["failed"]))
        print(
            "of which at the float32 floor (as close to float64 as the peer's own float32 maths, or its own fold): "
            + ("; ".join(s["failed_but_at_float32_floor"]) or "none")
        )


def report_line(row: dict) -> str:
    if "error" in row:
        return f"  {row['direction']:26s} {row['architecture']:28s} ERROR {row['error']}"
    return (
        f"  {row['direction']:26s} {row['architecture']:28s} nonzero {row['fraction_nonzero']:6.2%}  "
        f"codes {row['codes']['max_rel']:.1e}  recon {row['recon']['max_rel']:.1e}  "
        f"{'pass' if row['pass'] else 'FAIL'}{' (float32 floor)' if not row['pass'] and row.get('at_float32_floor') else ''}"
    )


if __name__ == "__main__":
    main()
