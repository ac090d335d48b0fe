"""The ``circuitsae`` command line.

Every sub-command's flags come from the same config dataclass as the Python
API. A usage mistake or bad input prints one line, ``circuitsae: error: ...``,
and exits with status 2; Ctrl-C exits with 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from circuitsae.config import add_arguments, from_arguments
from circuitsae.errors import CircuitSAEError
from circuitsae.harvest import HarvestConfig
from circuitsae.store import atomic_write

EXAMPLES = {
    "harvest": "examples:\n  circuitsae harvest --sites resid.3 resid.4 --tokens 200000 --out runs/acts\n"
    "  circuitsae harvest --model tiny-llama --corpus my_texts/ --tokens 5000 --out /tmp/acts",
    "train": "examples:\n  circuitsae train --store runs/acts --arch relu gated --out runs/saes\n"
    "  circuitsae train --store runs/acts --sites resid.4 --arch gated --coefficients 1 2 4 8 --expansion 4",
    "eval": "examples:\n  circuitsae eval runs/saes                      # every SAE in a training folder\n"
    "  circuitsae eval runs/saes/resid.4-gated-c2 --contexts 64 --out eval.json",
    "ioi": "examples:\n  circuitsae ioi runs/saes                       # every dictionary in a training folder, + PCA\n"
    "  circuitsae ioi runs/saes/resid.16-relu-c1 runs/saes/resid.16-relu-c0 --prompts 50 --out runs/ioi",
    "demo": "example:\n  circuitsae demo --out runs/demo",
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CircuitSAEError(f"{message} (see {self.prog} --help)")


def _cmd_harvest(args: argparse.Namespace) -> None:
    from circuitsae.harvest import harvest

    store = harvest(from_arguments(HarvestConfig, args))
    print(store)


def _cmd_train(args: argparse.Namespace) -> None:
    from circuitsae.train import TrainConfig, train

    cfg = from_arguments(TrainConfig, args)
    saved = train(cfg)
    if not saved:
        print(f"stopped after {cfg.stop_after} steps; re-run the same command to continue")
        return
    for name, sae in saved.items():
        m = sae.meta["metrics"]
        print(
            f"{name}: L0 {m.get('l0', float('nan')):.1f}, FVU {m.get('fvu', float('nan')):.3f}, "
            f"gamma {m.get('gamma', float('nan')):.3f} -> {cfg.out}/{name}"
        )
    print(f"next: circuitsae eval {cfg.out}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from circuitsae.evaluate import EvalConfig, evaluate, format_table

    args.dictionaries = args.paths
    report = evaluate(from_arguments(EvalConfig, args))
    print(format_table(report["results"]))
    print(f"wrote {report['path']}")


def _cmd_ioi(args: argparse.Namespace) -> None:
    from circuitsae.ioi_curves import IOIConfig, run_ioi

    args.dictionaries = args.paths
    report = run_ioi(from_arguments(IOIConfig, args))
    ioi = report["ioi"]
    print(f"IOI on {report['prompts']} prompts: logit diff {ioi['logit_diff']:.2f}, accuracy {ioi['accuracy']:.2f}")
    for r in report["results"]:
        last = r["start"]["all"]
        print(f"{r['site']} {r['label']:28s} {r['method']:11s} candidates {r['n_candidates']:5d}  "
              f"KL all {last['kl']:.3g}  {r['seconds']:.0f} s")  # fmt: skip
    print(f"wrote {report['path']} and kl_vs_patches.png ({report['seconds']:.0f} s)")


def _cmd_demo(args: argparse.Namespace) -> None:
    """The main job on the embedded defaults (grows as the library does)."""
    from circuitsae.evaluate import evaluate, format_table
    from circuitsae.harvest import harvest
    from circuitsae.train import train

    out = Path(args.out)
    store = harvest(HarvestConfig(sites=DEMO_SITES, tokens=args.tokens, out=str(out / "activations")))
    train(
        store=str(store.root),
        out=str(out / "saes"),
        arch=("relu", "gated"),
        expansion=4.0,
        gated_expansion=3.0,  # equal compute, as in the Gated paper
        lr=1e-3,  # one lr for both: the paper's 3e-4 for gated is for far longer runs
        batch_size=1024,
        epochs=2,
        tied=False,
        decoder_bias=True,
    )
    report = evaluate(dictionaries=(str(out / "saes"),), out=str(out / "eval.json"))
    print(format_table(report["results"]))
    summary = {
        "activations": str(store.root),
        "sites": store.sites,
        "train_tokens": store.n_rows("train"),
        "heldout_tokens": store.n_rows("heldout"),
        "model": store.config["model"],
        "corpus": store.config["corpus"],
        "saes": {
            k: {m: v.get(m) for m in ("l0", "fvu", "gamma", "loss_recovered", "delta_ce")}
            for k, v in report["results"].items()
        },
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2).encode())
    print(json.dumps({k: v for k, v in summary.items() if k != "saes"}, indent=2))


DEMO_SITES = ("resid.3", "resid.4", "resid.5")


def _add(
    sub: Any, name: str, help_: str, description: str, func: Any, cls: "type | None" = None
) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=help_,
        description=description,
        epilog=EXAMPLES[name],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if cls is not None:
        add_arguments(p, cls)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    from circuitsae.evaluate import EvalConfig
    from circuitsae.ioi_curves import IOIConfig
    from circuitsae.train import TrainConfig

    parser = _Parser(prog="circuitsae", description="Sparse-autoencoder circuits on real language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add(
        sub,
        "harvest",
        "record site activations over a corpus into a store",
        "Run the model through nnsight over a corpus and store the activations of one or more sites (resumable).",
        _cmd_harvest,
        HarvestConfig,
    )
    _add(
        sub,
        "train",
        "train baseline and/or Gated SAEs on a store, many in one pass",
        "Train every (site, architecture, coefficient) combination in one pass over the store; "
        "checkpointed and resumable.",
        _cmd_train,
        TrainConfig,
    )
    e = _add(
        sub,
        "eval",
        "L0, FVU, gamma, loss recovered of saved dictionaries",
        "Evaluate saved dictionaries on held-out data: reconstruction metrics, and loss recovered "
        "with each spliced into the model. Prints a table and writes JSON.",
        _cmd_eval,
        EvalConfig,
    )
    e.add_argument("paths", nargs="+", metavar="DICTIONARY", help="dictionary folders or training output folders")
    i = _add(
        sub,
        "ioi",
        "IOI feature patching with ACDC ordering: KL curves vs PCA and alpha=0",
        "Patch dictionary features from counterfactual IOI prompts into base prompts, order them by ACDC "
        "(and attribution), and plot KL against features patched and edit magnitude (Cunningham et al. Fig. 3).",
        _cmd_ioi,
        IOIConfig,
    )
    i.add_argument("paths", nargs="+", metavar="DICTIONARY", help="dictionary folders or training output folders")
    d = _add(
        sub,
        "demo",
        "run the main job end to end on the embedded defaults",
        "Harvest SmolLM2 activations on the embedded corpus, train baseline and Gated SAEs, evaluate them (resumable).",
        _cmd_demo,
    )
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    d.add_argument("--tokens", type=int, default=200_000, help="training tokens per site (default: 200000)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        args.func(args)
    except CircuitSAEError as e:
        print(f"circuitsae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("circuitsae: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


__all__ = ["main", "build_parser"]
