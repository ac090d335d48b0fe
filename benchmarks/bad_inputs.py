"""Bad input, tried as a careless or unlucky user would: a curated list of malformed inputs for every command.

Each case is one ``python -m circuitsae ...`` in a fresh process (``HF_HUB_OFFLINE=1``, GPUs hidden, the
tiny built-in models), and states what it expects: a refusal (exit 2 with one line, ``circuitsae: error:
...``) or a documented success (exit 0). Every numeric option of every command gets NaN, inf, -1, 0, a huge
value, a fraction where a whole number is due and text; then bad sites, unknown models, missing and wrong paths,
damaged saved dictionaries (a flipped byte, a flipped exponent bit, NaN weights under a rewritten manifest,
edited ``cfg.json`` sizes, no manifest), a store without held-out rows, a harvest or training of another
configuration into a finished folder, and a second writer into folders another process holds (refused naming
its PID; after ``kill -9`` of the holder the same commands succeed). The fixtures (a small text corpus, a
harvested and a synthetic store, trained tiny SAEs and damaged copies of one) are built once in a temporary
folder.

Each case is put in one of three categories: ``one-line refusal (exit 2)``, ``documented success (exit 0)``,
or ``OTHER`` (a traceback, exit 1, several error lines, a success where a refusal was expected or the reverse,
a message that does not say what the case requires). Progress bars (lines with ``\\r`` or ``it/s``,
``act/s``, ``tok/s``) are not counted as stderr lines; ``circuitsae: warning:`` lines are counted and shown.

    python benchmarks/bad_inputs.py

Writes ``benchmarks/results/bad_inputs.json`` (the machine, the command, counts by category and by command,
every case with its argv, where ``{tmp}`` stands for the temporary folder) and exits 1 if any case is OTHER.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

REFUSAL = "one-line refusal (exit 2)"
SUCCESS = "documented success (exit 0)"
OTHER = "OTHER"
ERROR = "circuitsae: error:"
WARNING = "circuitsae: warning:"

#: the bad values every numeric option gets; "fraction" only where a whole number is due
NAN, INF, NEG, ZERO, FRACTION, TEXT = "nan", "inf", "-1", "0", "0.5", "abc"
HUGE_INT = "100000000000000000000"  # 1e20, past every bound
HUGE_FLOAT = "1e30"


@dataclass
class Case:
    command: str
    what: str
    argv: list[str]
    expect: str  # "refusal" or "success"
    mentions: tuple[str, ...] = ()  # text the error line (a refusal) or the output (a success) must contain
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 300
    result: dict[str, Any] = field(default_factory=dict)


class Runner:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cwd = tmp / "cwd"  # every case runs here: a default output folder lands in the temporary folder
        self.cwd.mkdir()
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
        self.lock = threading.Lock()
        self.done = 0

    def real(self, text: str, state: dict) -> str:
        """``text`` with its placeholders (``{tmp}``, ``{holder_pid}``) replaced by what they stand for."""
        if "holder_pid" in state:
            text = text.replace("{holder_pid}", str(state["holder_pid"]))
        return text.replace("{tmp}", str(self.tmp))

    def shown(self, text: str, state: dict) -> str:
        """``text`` with the temporary folder (and a holder's PID) replaced by placeholders."""
        for p in sorted({str(self.tmp.resolve()), str(self.tmp)}, key=len, reverse=True):
            text = text.replace(p, "{tmp}")
            for k in range(len(p) - 1, 4, -1):  # a path cut short in a message, "/tmp/circuitsa…"
                text = text.replace(p[:k] + "…", "{tmp}…")
        text = text.replace(str(ROOT), "{repo}")
        if "holder_pid" in state:
            text = text.replace(f"process {state['holder_pid']}", "process {holder_pid}")
        return text

    def run(self, case: Case, state: dict) -> None:
        argv = [self.real(a, state) for a in case.argv]
        env = {**self.env, **{k: self.real(v, state) for k, v in case.env.items()}}
        t0 = time.perf_counter()
        try:
            p = subprocess.run(
                [sys.executable, "-m", "circuitsae", *argv], cwd=self.cwd, env=env, capture_output=True,
                text=True, errors="replace", timeout=case.timeout,
            )  # fmt: skip
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc = None
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        seconds = time.perf_counter() - t0
        lines = [line for line in err.split("\n") if line.strip()]
        progress = [line for line in lines if "\r" in line or any(u in line for u in ("it/s", "act/s", "tok/s"))]
        lines = [line for line in lines if line not in progress]
        errors = [line for line in lines if line.startswith(ERROR)]
        warnings = [line for line in lines if line.startswith(WARNING)]
        others = [line for line in lines if line not in errors and line not in warnings]
        traceback = "Traceback" in out or "Traceback" in err
        said = errors[0] if case.expect == "refusal" and errors else out + err
        # a mention is satisfied by any of its alternatives, "a|b"
        missing = [m for m in case.mentions if not any(self.real(a, state) in said for a in m.split("|"))]
        why = None
        if rc is None:
            why = f"timed out after {case.timeout:.0f} s"
        elif traceback:
            why = "a traceback"
        elif len(errors) > 1:
            why = f"{len(errors)} error lines"
        elif case.expect == "refusal":
            if rc != 2:
                why = f"exit {rc} where a refusal (exit 2) was expected"
            elif not errors:
                why = "exit 2 without a 'circuitsae: error:' line"
            elif others:
                why = f"{len(others)} stderr line(s) besides the error line"
        elif rc != 0:
            why = f"exit {rc} where a success (exit 0) was expected"
        elif errors:
            why = "exit 0 with an error line"
        if why is None and missing:
            why = f"the output does not say {missing}"
        category = OTHER if why else REFUSAL if case.expect == "refusal" else SUCCESS
        case.result = {
            "command": case.command,
            "what": case.what,
            "argv": ["circuitsae", *case.argv],
            "expect": case.expect,
            "exit_code": rc,
            "stderr_lines": len(lines),
            "traceback": traceback,
            "error_line": self.shown(errors[0], state) if errors else None,
            "warnings": [self.shown(w, state) for w in warnings],
            "category": category,
            "seconds": round(seconds, 2),
        }
        if case.mentions:
            case.result["must_say"] = list(case.mentions)
        if why:
            case.result["why_other"] = why
            case.result["output"] = self.shown((out + err)[-4000:], state)
        with self.lock:
            self.done += 1
            tag = "ok " if category != OTHER else "!! "
            print(f"{tag}{self.done:4d} {seconds:6.1f}s  {case.command:8s} {case.what}" + (f"  [{why}]" if why else ""),
                  flush=True)  # fmt: skip

    def chain(self, steps: list) -> None:
        state: dict = {}
        try:
            for step in steps:
                if isinstance(step, Case):
                    self.run(step, state)
                else:
                    step(state)
        finally:
            for p in state.pop("_processes", []):
                if p.poll() is None:
                    p.kill()
                    p.wait()


# -- fixtures ------------------------------------------------------------------------------------------------
WORDS = (
    "the state of the union is strong and the people are free to speak their minds while markets rose sharply "
    "in london as investors welcomed the news from the bank"
).split()


def cli(tmp: Path, *argv: str) -> None:
    """Run one fixture command; it must succeed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-m", "circuitsae", *argv], cwd=tmp, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"fixture command failed: circuitsae {' '.join(argv)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")


def rewrite_manifest(folder: Path) -> None:
    """Recompute ``manifest.json``'s sizes and hashes, as someone who edits a saved folder by hand might."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def flip(path: Path, offset: int, mask: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def tensor_data_start(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def build_fixtures(tmp: Path) -> dict[str, str]:
    """The corpus, stores, trained SAEs and damaged copies the cases use; returns a few names."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from circuitsae.data.store import store_from_tensors

    corpus = tmp / "corpus"
    corpus.mkdir()
    rng = __import__("random").Random(1)
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(500)))
    (tmp / "empty").mkdir()
    (tmp / "afile").write_text("not a folder\n")
    (tmp / "binary.bin").write_bytes(bytes(range(256)) * 4)
    # a harvested store (real contexts: eval, ioi, feature and tree need them) and two SAEs trained on it
    harvest = ["harvest", "--model", "tiny-llama", "--sites", "resid.0", "resid.1", "--tokens", "3000",
               "--ctx-len", "16", "--corpus", str(corpus), "--device", "cpu"]  # fmt: skip
    cli(tmp, *harvest, "--out", str(tmp / "acts"))
    cli(tmp, "train", "--store", str(tmp / "acts"), "--out", str(tmp / "saes"), "--arch", "relu", "--expansion", "2",
        "--batch-size", "128", "--device", "cpu")  # fmt: skip
    # a synthetic store of tiny-llama's width (64) for the training cases, and an SAE trained on it
    x = torch.randn(2048 + 512, 64, generator=torch.Generator().manual_seed(0))
    store_from_tensors(tmp / "tstore", {"resid.0": x[:2048]}, {"resid.0": x[2048:]}, model="tiny-llama")
    cli(tmp, "train", "--store", str(tmp / "tstore"), "--out", str(tmp / "tsaes"), "--arch", "relu",
        "--batch-size", "128", "--device", "cpu")  # fmt: skip
    sae = next(p for p in sorted((tmp / "saes").iterdir()) if p.name.startswith("resid.1-relu"))
    sae0 = next(p for p in sorted((tmp / "saes").iterdir()) if p.name.startswith("resid.0-relu"))
    shutil.copytree(sae, tmp / "d" / "sae")  # as deep as in saes/: its store, "../../acts", resolves
    weights = tmp / "d" / "sae" / "sae.safetensors"
    start = tensor_data_start(weights)

    def damaged(name: str) -> Path:
        d = tmp / "bad" / name
        shutil.copytree(tmp / "d" / "sae", d)
        return d

    flip(damaged("flipped-byte") / "sae.safetensors", weights.stat().st_size - 1, 0x01)  # the last mantissa bit
    flip(damaged("flipped-exponent") / "sae.safetensors", start + 3, 0x40)  # the first float, times 2**128
    flip(damaged("flipped-cfg") / "cfg.json", 2, 0x01)  # one byte of cfg.json
    d = damaged("nan-weights")
    with safe_open(str(d / "sae.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = max(tensors, key=lambda k: tensors[k].numel())
    tensors[name].view(-1)[7] = float("nan")
    save_file(tensors, str(d / "sae.safetensors"), metadata=meta)
    rewrite_manifest(d)
    cfg = json.loads((tmp / "d" / "sae" / "cfg.json").read_text())
    for key, value in (("d_dict", 10**12), ("d", 10**9), ("d_dict", "512")):
        if key not in cfg:
            sys.exit(f"the saved cfg.json has no {key!r}: {sorted(cfg)}")
        d = damaged(f"cfg-{key}-{value}".replace('"', ""))
        (d / "cfg.json").write_text(json.dumps({**cfg, key: value}, indent=1))
        rewrite_manifest(d)
    (damaged("no-manifest") / "manifest.json").unlink()
    shutil.copytree(tmp / "d" / "sae", tmp / "nonempty")  # a folder that is not empty, for convert
    (tmp / "half").mkdir()  # a folder with cfg.json but no weights
    (tmp / "half" / "cfg.json").write_text("{}")
    return {"sae0": sae0.name, "harvest": " ".join(harvest[1:]).replace(str(tmp), "{tmp}")}


# -- the cases -----------------------------------------------------------------------------------------------
class Cases:
    def __init__(self) -> None:
        self.chains: list[list] = []
        self.n = 0

    def out(self) -> str:
        """A fresh output folder of its own for one case (cases run in parallel)."""
        self.n += 1
        return f"{{tmp}}/o/{self.n}"

    def add(self, *cases: Case) -> None:
        self.chains.append(list(cases))

    def refuse(self, command: str, what: str, argv: list[str], *mentions: str, **kw: Any) -> None:
        self.add(Case(command, what, argv, "refusal", mentions, **kw))

    def succeed(self, command: str, what: str, argv: list[str], *mentions: str, **kw: Any) -> None:
        self.add(Case(command, what, argv, "success", mentions, **kw))

    def numbers(self, command: str, base: Callable[[], list[str]], option: str, integer: bool,
                ok: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> None:  # fmt: skip
        """``option`` with NaN, inf, -1, 0, a huge value, a fraction (whole numbers only) and text; the values
        in ``ok`` are in the option's documented range (a success), every other one is refused naming it."""
        values = [NAN, INF, NEG, ZERO, HUGE_INT if integer else HUGE_FLOAT, *([FRACTION] if integer else []), TEXT]
        name = option.lstrip("-").replace("-", "_")
        for v in [*values, *extra]:
            argv = [*base(), option, v]
            if v in ok:
                self.succeed(command, f"{option} {v}", argv)
            else:
                self.refuse(command, f"{option} {v}", argv, f"{name}|{option}")


def cases(names: dict[str, str]) -> list[list]:
    c = Cases()
    sae, sae0, bad = "{tmp}/d/sae", "{tmp}/saes/" + names["sae0"], "{tmp}/bad"
    cpu = ["--device", "cpu"]

    # harvest --------------------------------------------------------------------------------------------------
    def harvest(*extra: str) -> list[str]:
        return ["harvest", "--model", "tiny-llama", "--sites", "resid.0", "--tokens", "200", "--ctx-len", "16",
                "--corpus", "{tmp}/corpus", "--out", c.out(), *cpu, *extra]  # fmt: skip

    for opt in ("--tokens", "--ctx-len", "--batch-size", "--seed", "--heldout-tokens", "--shard-contexts"):
        c.numbers("harvest", harvest, opt, True, ok={"--seed": (ZERO,), "--heldout-tokens": (ZERO,)}.get(opt, ()))
    c.numbers("harvest", harvest, "--heldout-fraction", False, extra=("1",))
    c.refuse("harvest", "--ctx-len 1", harvest("--ctx-len", "1"), "ctx_len")
    c.refuse(
        "harvest", "--tokens 10**12 (within the bound, past the memory or disk)", harvest("--tokens", "1000000000000")
    )
    c.refuse("harvest", "--sites resid.999", harvest("--sites", "resid.999"), "resid.999")
    c.refuse("harvest", "--sites foo.1", harvest("--sites", "foo.1"), "foo.1")
    c.refuse("harvest", "--sites '' (empty)", harvest("--sites", ""))
    c.refuse("harvest", "--sites resid.-1", harvest("--sites", "resid.-1"))
    c.refuse("harvest", "--model no-such-model", harvest("--model", "no-such-model"), "no-such-model")
    c.refuse("harvest", "--model '' (empty)", harvest("--model", ""))
    c.refuse("harvest", "--model a folder that does not exist", harvest("--model", "{tmp}/nowhere/model"))
    c.refuse("harvest", "--model a file", harvest("--model", "{tmp}/afile"))
    c.refuse("harvest", "--model a folder without a model", harvest("--model", "{tmp}/corpus"))
    c.refuse("harvest", "--model gpt2 (a hub id not cached, offline)", harvest("--model", "gpt2"))
    c.refuse("harvest", "--corpus a folder that does not exist", harvest("--corpus", "{tmp}/nowhere"))
    c.refuse("harvest", "--corpus an empty folder", harvest("--corpus", "{tmp}/empty"))
    c.refuse("harvest", "--corpus a binary file", harvest("--corpus", "{tmp}/binary.bin"))
    c.refuse("harvest", "--out an existing file", harvest("--out", "{tmp}/afile"))
    c.refuse("harvest", "--out under a file", harvest("--out", "{tmp}/afile/store"))
    c.refuse("harvest", "--out a dictionary folder", harvest("--out", "{tmp}/nonempty"))
    c.refuse("harvest", "--dtype float8", harvest("--dtype", "float8"), "float8")
    c.refuse("harvest", "--model-dtype int8", harvest("--model-dtype", "int8"), "int8")
    c.refuse("harvest", "--device tpu", harvest("--device", "tpu"), "tpu")
    c.refuse("harvest", "--device cuda (none here)", harvest("--device", "cuda"), "cuda")
    c.refuse("harvest", "--device cuda:7 (none here)", harvest("--device", "cuda:7"), "cuda:7")
    c.refuse("harvest", "an unknown flag --tokenz", harvest("--tokenz", "5"), "--tokenz")

    # train ----------------------------------------------------------------------------------------------------
    def train(*extra: str, arch: str = "relu") -> list[str]:
        return ["train", "--store", "{tmp}/tstore", "--out", c.out(), "--arch", arch, "--batch-size", "128",
                *cpu, *extra]  # fmt: skip

    ints = {"--batch-size": (), "--epochs": (), "--resample-every": (NEG, ZERO), "--checkpoint-every": (),
            "--log-every": (), "--eval-rows": (), "--seed": (ZERO,), "--stop-after": ()}  # fmt: skip
    for opt, ok in ints.items():
        c.numbers("train", train, opt, True, ok=ok)
    floats = {"--coefficients": (ZERO,), "--expansion": (), "--gated-expansion": (), "--lr": (),
              "--lr-warmup": (ZERO,), "--coef-warmup": (ZERO,)}  # fmt: skip
    for opt, ok in floats.items():
        c.numbers("train", train if opt != "--gated-expansion" else lambda: train(arch="gated"), opt, False, ok=ok)
    c.refuse("train", "--expansion 1e10", train("--expansion", "1e10"), "expansion")
    c.refuse("train", "--stop-after -1", train("--stop-after", "-1"), "stop_after")
    c.refuse("train", "--resample-every -5", train("--resample-every", "-5"), "resample_every")
    c.refuse("train", "--lr-warmup 1.5", train("--lr-warmup", "1.5"), "lr_warmup")
    c.refuse("train", "--batch-size 10**9 (within the bound, past the store)", train("--batch-size", "1000000000"),
             "batch")  # fmt: skip
    c.refuse("train", "--expansion 4096 under CIRCUITSAE_MEMORY_LIMIT=64M (past the memory)",
             train("--expansion", "4096"), "memory", env={"CIRCUITSAE_MEMORY_LIMIT": "64M"})  # fmt: skip
    c.succeed("train", "--expansion 0.5", train("--expansion", "0.5"))
    c.succeed("train", "--stop-after 1 (stops with a checkpoint)", train("--stop-after", "1"))
    c.refuse("train", "--lr 1e30 (diverges)", train("--lr", "1e30"), "diverged")
    for arch in ("topk", "batchtopk"):
        for v in (NAN, INF, ZERO, FRACTION, NEG):
            c.refuse("train", f"--arch {arch} --coefficients {v}", train("--coefficients", v, arch=arch), "coefficient")
    c.refuse("train", "--arch gated --coefficients nan", train("--coefficients", NAN, arch="gated"), "coefficients")
    c.refuse("train", "--arch jumprelu --coefficients inf", train("--coefficients", INF, arch="jumprelu"))
    for v in ("topk=inf", "topk=nan", "topk=0", "topk=0.5", "relu=-1", "gated=nan", "foo=1", "topk", "topk=",
              "topk=abc", "=4"):  # fmt: skip
        c.refuse("train", f"--arch-coefficients {v}", train("--arch-coefficients", v, arch="topk"))
    c.refuse("train", "--arch foo", train(arch="foo"), "foo")
    c.refuse("train", "--arch '' (empty)", train(arch=""))
    c.refuse("train", "--sites resid.999", train("--sites", "resid.999"), "resid.999")
    c.refuse("train", "--sites foo.1", train("--sites", "foo.1"), "foo.1")
    c.refuse("train", "--sites '' (empty)", train("--sites", ""))
    c.refuse("train", "--store a folder that does not exist", train("--store", "{tmp}/nowhere"))
    c.refuse("train", "--store a file", train("--store", "{tmp}/afile"))
    c.refuse("train", "--store an empty folder", train("--store", "{tmp}/empty"))
    c.refuse("train", "--store a dictionary folder", train("--store", sae))
    c.refuse("train", "--out an existing file", train("--out", "{tmp}/afile"))
    c.refuse("train", "--out under a file", train("--out", "{tmp}/afile/saes"))
    c.refuse("train", "--parallel both", train("--parallel", "both"), "both")
    c.refuse("train", "--device tpu", train("--device", "tpu"), "tpu")
    c.refuse("train", "--device cuda (none here)", train("--device", "cuda"))
    c.refuse("train", "--coefficients given twice over (nan and 1)", train("--coefficients", "1", "nan"))

    # eval -----------------------------------------------------------------------------------------------------
    def evaluate(*extra: str, dictionary: str = sae) -> list[str]:
        return ["eval", dictionary, "--contexts", "4", "--rows", "256", "--out", c.out() + "/eval.json", *cpu, *extra]

    for opt in ("--contexts", "--rows", "--batch-size"):
        c.numbers("eval", evaluate, opt, True)
    c.succeed("eval", "a good dictionary", evaluate())
    c.refuse("eval", "a dictionary folder that does not exist", evaluate(dictionary="{tmp}/nowhere"))
    c.refuse("eval", "a file as the dictionary", evaluate(dictionary="{tmp}/afile"))
    c.refuse("eval", "an empty folder as the dictionary", evaluate(dictionary="{tmp}/empty"))
    c.refuse("eval", "a store as the dictionary", evaluate(dictionary="{tmp}/acts"))
    c.refuse("eval", "a folder with cfg.json {} and no weights", evaluate(dictionary="{tmp}/half"))
    c.refuse("eval", "--out a folder", ["eval", sae, "--contexts", "4", "--out", "{tmp}/empty", *cpu])
    c.refuse("eval", "--out under a file", ["eval", sae, "--contexts", "4", "--out", "{tmp}/afile/eval.json", *cpu])
    c.refuse("eval", "--store a folder that does not exist", evaluate("--store", "{tmp}/nowhere"))
    c.refuse("eval", "--store a file", evaluate("--store", "{tmp}/afile"))
    c.refuse("eval", "--store without the dictionary's site (the synthetic store)", evaluate("--store",
             "{tmp}/tstore"))  # fmt: skip
    c.refuse("eval", "--model no-such-model", evaluate("--model", "no-such-model"), "no-such-model")
    c.refuse("eval", "--model tiny-gpt2 (not the dictionary's model)", evaluate("--model", "tiny-gpt2"))
    c.refuse("eval", "--model-dtype int8", evaluate("--model-dtype", "int8"))
    c.refuse("eval", "no dictionary at all", ["eval", "--contexts", "4", *cpu])

    # damaged dictionaries, for eval and convert ----------------------------------------------------------------
    damaged = {
        "flipped-byte": ("a flipped byte in sae.safetensors", "sha256"),
        "flipped-exponent": ("a flipped exponent bit in sae.safetensors", "sha256"),
        "flipped-cfg": ("a flipped byte in cfg.json", "cfg.json"),
        "nan-weights": ("a NaN weight, manifest rewritten to match", "NaN"),
        "cfg-d_dict-1000000000000": ('cfg.json "d_dict": 10**12, manifest rewritten', "d_dict"),
        "cfg-d-1000000000": ('cfg.json "d": 10**9, manifest rewritten', ""),
        "cfg-d_dict-512": ('cfg.json "d_dict": "512", manifest rewritten', "d_dict"),
    }
    for folder, (what, says) in damaged.items():
        mentions = (says,) if says else ()
        c.refuse("eval", what, evaluate(dictionary=f"{bad}/{folder}"), *mentions)
        c.refuse("convert", what, ["convert", f"{bad}/{folder}", c.out(), "--to", "circuitsae"], *mentions)
        c.refuse("convert", what + " (to saelens)", ["convert", f"{bad}/{folder}", c.out(), "--to", "saelens"])
    no_manifest = f"{bad}/no-manifest"
    c.succeed("eval", "manifest.json deleted (loads, with a warning)", evaluate(dictionary=no_manifest),
              "has no manifest.json")  # fmt: skip
    c.succeed("convert", "manifest.json deleted (converts, with a warning)",
              ["convert", no_manifest, c.out(), "--to", "circuitsae"], "has no manifest.json")  # fmt: skip
    c.succeed("eval", "CIRCUITSAE_VERIFY=0 (hashes skipped, with a warning)", evaluate(), "not checked",
              env={"CIRCUITSAE_VERIFY": "0"})  # fmt: skip

    # convert --------------------------------------------------------------------------------------------------
    c.succeed("convert", "a good dictionary to circuitsae", ["convert", sae, c.out(), "--to", "circuitsae"])
    c.succeed("convert", "a good dictionary to saelens", ["convert", sae, c.out(), "--to", "saelens"])
    c.refuse("convert", "convert IN IN", ["convert", sae, sae, "--to", "circuitsae"])
    c.refuse("convert", "convert IN IN/inside", ["convert", sae, sae + "/inside", "--to", "circuitsae"])
    c.refuse("convert", "into a non-empty folder", ["convert", sae, "{tmp}/nonempty", "--to", "circuitsae"],
             "not empty")  # fmt: skip
    c.refuse("convert", "OUT an existing file", ["convert", sae, "{tmp}/afile", "--to", "circuitsae"])
    c.refuse("convert", "OUT under a file", ["convert", sae, "{tmp}/afile/out", "--to", "circuitsae"])
    c.refuse("convert", "IN a folder that does not exist", ["convert", "{tmp}/nowhere", c.out(), "--to", "saelens"])
    c.refuse("convert", "IN a file", ["convert", "{tmp}/afile", c.out(), "--to", "saelens"])
    c.refuse("convert", "IN an empty folder", ["convert", "{tmp}/empty", c.out(), "--to", "saelens"])
    c.refuse("convert", "IN a store", ["convert", "{tmp}/acts", c.out(), "--to", "saelens"])
    c.refuse("convert", "IN a training output folder (several dictionaries)",
             ["convert", "{tmp}/saes", c.out(), "--to", "saelens"])  # fmt: skip
    c.refuse("convert", "no --to", ["convert", sae, c.out()], "--to")
    c.refuse("convert", "--to onnx", ["convert", sae, c.out(), "--to", "onnx"], "onnx")
    c.refuse("convert", "a ReLU SAE written --architecture topk",
             ["convert", sae, c.out(), "--to", "saelens", "--architecture", "topk"])  # fmt: skip
    c.refuse("convert", "OUT empty string", ["convert", sae, "", "--to", "circuitsae"])

    # ioi ------------------------------------------------------------------------------------------------------
    def ioi(*extra: str, dictionary: str = sae) -> list[str]:
        return ["ioi", dictionary, "--prompts", "2", "--thresholds", "2", "--pca-rows", "500", "--no-acdc",
                "--out", c.out(), *cpu, *extra]  # fmt: skip

    for opt in ("--prompts", "--thresholds", "--pca-rows", "--seed", "--heldout-prompts"):
        c.numbers("ioi", ioi, opt, True, ok={"--seed": (ZERO,), "--heldout-prompts": (ZERO,)}.get(opt, ()))
    c.refuse("ioi", "--thresholds 10001", ioi("--thresholds", "10001"), "thresholds")
    c.refuse("ioi", "a dictionary folder that does not exist", ioi(dictionary="{tmp}/nowhere"))
    c.refuse("ioi", "a NaN weight in the dictionary", ioi(dictionary=f"{bad}/nan-weights"), "NaN")
    c.refuse("ioi", "--model no-such-model", ioi("--model", "no-such-model"), "no-such-model")
    c.refuse("ioi", "--out an existing file", ioi("--out", "{tmp}/afile"))
    c.refuse("ioi", "--out under a file", ioi("--out", "{tmp}/afile/ioi"))
    c.refuse("ioi", "--engine fast", ioi("--engine", "fast"), "fast")

    # feature --------------------------------------------------------------------------------------------------
    def feature(*extra: str, target: str = "resid.1:3") -> list[str]:
        return ["feature", target, "--dictionaries", sae, "--contexts", "3", "--out", c.out(), *cpu, *extra]

    c.numbers("feature", feature, "--contexts", True)
    c.numbers("feature", feature, "--coefficient", False)
    c.succeed("feature", "a good feature", feature())
    for target in ("resid.999:1", "foo.1:1", ":1", "resid.1:", "resid.1", "resid.1:-1", "resid.1:abc",
                   "resid.1:1e9", "resid.1:nan", "resid.1:100000000000000000000", ""):  # fmt: skip
        c.refuse("feature", f"target {target!r}", feature(target=target))
    c.refuse("feature", "no --dictionaries", ["feature", "resid.1:3", "--out", c.out(), *cpu])
    c.refuse("feature", "--dictionaries a folder that does not exist", feature("--dictionaries", "{tmp}/nowhere"))
    c.refuse("feature", "--arch foo (no dictionary left)", feature("--arch", "foo"))
    c.refuse("feature", "--coefficient 99 (no dictionary left)", feature("--coefficient", "99"))
    c.refuse("feature", "--store a file", feature("--store", "{tmp}/afile"))
    c.refuse("feature", "--split test", feature("--split", "test"), "test")
    c.refuse("feature", "--out an existing file", feature("--out", "{tmp}/afile"))
    c.refuse("feature", "--model no-such-model", feature("--model", "no-such-model"))
    c.refuse("feature", "a flipped byte in the dictionary", feature("--dictionaries", f"{bad}/flipped-byte"))

    # tree -----------------------------------------------------------------------------------------------------
    def tree(*extra: str, target: str = "resid.1:3") -> list[str]:
        return ["tree", target, "--dictionaries", sae0, sae, "--depth", "1", "--branching", "2", "--contexts", "3",
                "--out", c.out() + "/tree", *cpu, *extra]  # fmt: skip

    for opt in ("--depth", "--branching", "--contexts", "--seed", "--max-nodes"):
        c.numbers("tree", tree, opt, True, ok={"--seed": (ZERO,)}.get(opt, ()))
    c.numbers("tree", tree, "--coefficient", False)
    c.succeed("tree", "a good tree", tree())
    for target in ("resid.999:1", "foo.1:1", "resid.1:-1", "resid.1:abc", "resid.1"):
        c.refuse("tree", f"target {target!r}", tree(target=target))
    c.refuse("tree", "--out under a file", tree("--out", "{tmp}/afile/tree"))
    c.refuse("tree", "--out a folder", tree("--out", "{tmp}/empty"))
    c.refuse("tree", "--mode random", tree("--mode", "random"), "random")
    c.refuse("tree", "--dictionaries a folder that does not exist", tree("--dictionaries", "{tmp}/nowhere"))

    # demo -----------------------------------------------------------------------------------------------------
    def demo(*extra: str) -> list[str]:
        return ["demo", "--out", c.out(), "--model", "tiny-llama", "--sites", "resid.0", "resid.1", "--tokens",
                "2000", "--ioi-prompts", "2", "--ioi-thresholds", "2", "--tree-contexts", "2", *cpu, *extra]  # fmt: skip

    for opt in ("--tokens", "--ioi-prompts", "--ioi-thresholds", "--tree-contexts", "--branching"):
        c.numbers("demo", demo, opt, True)
    c.numbers("demo", demo, "--scale", False)
    c.refuse("demo", "--ioi-prompts 51", demo("--ioi-prompts", "51"), "ioi_prompts")
    c.refuse("demo", "--sites resid.1 (one site)", demo("--sites", "resid.1"), "two")
    c.refuse("demo", "--sites resid.999 resid.1000", demo("--sites", "resid.999", "resid.1000"))
    c.refuse("demo", "--sites foo.1 foo.2", demo("--sites", "foo.1", "foo.2"))
    c.refuse("demo", "--model no-such-model", demo("--model", "no-such-model"), "no-such-model")
    c.refuse("demo", "--out an existing file", demo("--out", "{tmp}/afile"))
    c.refuse("demo", "--out under a file", demo("--out", "{tmp}/afile/demo"))
    c.refuse("demo", "--device tpu", demo("--device", "tpu"))

    # everywhere -----------------------------------------------------------------------------------------------
    c.refuse("(none)", "an unknown command", ["frobnicate"], "frobnicate")
    c.refuse("train", "an unknown flag --lrr", train("--lrr", "1e-3"), "--lrr")
    c.refuse("train", "a flag without its value", [*train(), "--lr"], "--lr")

    # workflows: a store without held-out rows; another configuration into a finished folder ----------------
    noheld = "{tmp}/noheld"
    c.add(
        Case("harvest", "--heldout-tokens 0 (stores no held-out rows)", ["harvest", "--model", "tiny-llama",
             "--sites", "resid.0", "--tokens", "400", "--ctx-len", "16", "--corpus", "{tmp}/corpus",
             "--heldout-tokens", "0", "--out", noheld, *cpu], "success"),
        Case("train", "on the store without held-out rows (says there are no held-out metrics)", ["train",
             "--store", noheld, "--out", noheld + "-saes", "--arch", "relu", "--batch-size", "64", *cpu], "success",
             ("held-out",)),
        Case("eval", "a dictionary of the store without held-out rows", ["eval", noheld + "-saes", "--contexts", "4",
             *cpu], "refusal", ("held-out",)),
    )  # fmt: skip
    again = ["harvest", *names["harvest"].split(), "--out", "{tmp}/acts2"]
    c.add(
        Case("harvest", "a store (the fixture's command)", again, "success"),
        Case("harvest", "--ctx-len 8 into that store", [*again, "--ctx-len", "8"], "refusal"),
        Case("harvest", "--model tiny-gpt2 into that store", [*again, "--model", "tiny-gpt2"], "refusal"),
        Case("harvest", "--sites resid.1 into that store", [*again, "--sites", "resid.1"], "refusal"),
        Case("harvest", "the first command again (already complete)", again, "success"),
    )
    lr = ["train", "--store", "{tmp}/tstore", "--out", "{tmp}/lr", "--arch", "relu", "--batch-size", "128", *cpu]
    c.add(
        Case("train", "--lr 1e-3 (a first training)", [*lr, "--lr", "1e-3"], "success"),
        Case("train", "--lr 5e-4 into the finished folder", [*lr, "--lr", "5e-4"], "refusal", ("lr=",)),
        Case("train", "--arch gated into the finished folder", [*lr, "--lr", "1e-3", "--arch", "gated"], "refusal",
             ("arch=",)),
        Case("train", "--store (the harvested one) into the finished folder", [*lr, "--lr", "1e-3", "--store",
             "{tmp}/acts"], "refusal"),
        Case("train", "--lr 1e-3 again (the same training: a finished folder re-runs)", [*lr, "--lr", "1e-3"],
             "success"),
    )  # fmt: skip

    # two writers: a process holds the lock of each output folder --------------------------------------------
    busy = "{tmp}/busy"
    writers = {
        "harvest": ["harvest", "--model", "tiny-llama", "--sites", "resid.0", "--tokens", "200", "--ctx-len", "16",
                    "--corpus", "{tmp}/corpus", "--out", f"{busy}/harvest", *cpu],
        "train": ["train", "--store", "{tmp}/tstore", "--out", f"{busy}/train", "--arch", "relu", "--batch-size",
                  "128", *cpu],
        "eval": ["eval", sae, "--contexts", "4", "--rows", "256", "--out", f"{busy}/eval/eval.json", *cpu],
        "convert": ["convert", sae, f"{busy}/convert", "--to", "circuitsae"],
        "ioi": ["ioi", sae, "--prompts", "2", "--thresholds", "2", "--pca-rows", "500", "--no-acdc", "--out",
                f"{busy}/ioi", *cpu],
        "feature": ["feature", "resid.1:3", "--dictionaries", sae, "--contexts", "3", "--out", f"{busy}/feature",
                    *cpu],
        "tree": ["tree", "resid.1:3", "--dictionaries", sae0, sae, "--depth", "1", "--branching", "2", "--contexts",
                 "3", "--out", f"{busy}/tree/tree", *cpu],
        "demo": ["demo", "--out", f"{busy}/demo", "--model", "tiny-llama", "--sites", "resid.0", "resid.1",
                 "--tokens", "2000", "--ioi-prompts", "2", "--ioi-thresholds", "2", "--tree-contexts", "2", *cpu],
    }  # fmt: skip
    folders = [f"{busy}/{name}" for name in writers]

    def hold(state: dict) -> None:
        p = subprocess.Popen([sys.executable, "-c", HOLD, *[state["_real"](f) for f in folders]],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
        state.setdefault("_processes", []).append(p)
        if p.stdout.readline().strip() != "held":
            raise RuntimeError("the lock holder did not start")
        state["holder_pid"] = p.pid

    def kill(state: dict) -> None:
        p = state["_processes"][-1]
        p.send_signal(signal.SIGKILL)
        p.wait()
        print(f"     killed the lock holder (process {state['holder_pid']}) with SIGKILL", flush=True)

    steps: list = [hold]
    for name, argv in writers.items():
        steps.append(Case(name, "into a folder another process holds", argv, "refusal",
                          ("is being written by process {holder_pid}",)))  # fmt: skip
    steps.append(kill)
    for name, argv in writers.items():
        steps.append(Case(name, "the same command after kill -9 of the holder", argv, "success", timeout=900))
    c.add(*steps)
    return c.chains


HOLD = (
    "import sys, time\n"
    "from circuitsae.io import lock_folder\n"
    "locks = [lock_folder(f, 'test').acquire() for f in sys.argv[1:]]\n"
    "print('held', flush=True)\n"
    "time.sleep(3600)\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="cases run at once")
    ap.add_argument("--out", default=str(RESULTS / "bad_inputs.json"))
    ap.add_argument("--match", default=None, help="run only the chains with a case whose 'command what' matches "
                    "this regular expression (a quick look; the results then go to --out as well)")  # fmt: skip
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="circuitsae-bad-") as name:
        tmp = Path(name)
        print("building the fixtures ...", flush=True)
        names = build_fixtures(tmp)
        print(f"fixtures ready in {time.perf_counter() - t0:.0f} s", flush=True)
        runner = Runner(tmp)
        chains = cases(names)
        if args.match:
            chains = [ch for ch in chains if any(isinstance(s, Case) and re.search(args.match, f"{s.command} {s.what}")
                                                 for s in ch)]  # fmt: skip
        # the longest chains first, so that they do not finish last alone
        chains.sort(key=lambda ch: -sum(isinstance(s, Case) for s in ch))
        for ch in chains:
            ch.insert(0, lambda state: state.update(_real=lambda text: runner.real(text, state)))
        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            for f in [pool.submit(runner.chain, ch) for ch in chains]:
                f.result()
        rows = [s.result for ch in chains for s in ch if isinstance(s, Case)]
    seconds = time.perf_counter() - t0
    by_category = collections.Counter(r["category"] for r in rows)
    by_command: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rows:
        by_command[r["command"]][r["category"]] += 1
    command = "python benchmarks/bad_inputs.py" + (f" --match '{args.match}'" if args.match else "")
    result = {
        "machine": describe(),
        "command": command,
        "seconds": round(seconds, 1),
        "cases": len(rows),
        "by_category": dict(sorted(by_category.items())),
        "by_command": {k: dict(sorted(v.items())) for k, v in sorted(by_command.items())},
        "expected": dict(collections.Counter(r["expect"] for r in rows)),
        "other": [r for r in rows if r["category"] == OTHER],
        "every_case": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"\n{len(rows)} bad inputs in {seconds:.0f} s: " + ", ".join(f"{n} {k}" for k, n in by_category.items()))
    for k, v in sorted(by_command.items()):
        print(f"  {k:8s} " + ", ".join(f"{n} {cat}" for cat, n in sorted(v.items())))
    for r in result["other"]:
        print(f"\nOTHER: {' '.join(r['argv'])}\n  {r['why_other']}\n" + r["output"][-1500:])
    if by_category.get(OTHER):
        sys.exit(1)


if __name__ == "__main__":
    main()
