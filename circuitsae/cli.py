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

from circuitsae.config import add_arguments, from_arguments
from circuitsae.errors import CircuitSAEError
from circuitsae.harvest import HarvestConfig

EXAMPLES = {
    "harvest": "examples:\n  circuitsae harvest --sites resid.3 resid.4 --tokens 200000 --out runs/acts\n"
    "  circuitsae harvest --model tiny-llama --corpus my_texts/ --tokens 5000 --out /tmp/acts",
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


def _cmd_demo(args: argparse.Namespace) -> None:
    """The main job on the embedded defaults (grows as the library does)."""
    from circuitsae.harvest import harvest

    store = harvest(
        HarvestConfig(sites=("resid.3", "resid.4", "resid.5"), tokens=args.tokens, out=f"{args.out}/activations")
    )
    summary = {
        "activations": str(store.root),
        "sites": store.sites,
        "d": store.d,
        "train_tokens": store.n_rows("train"),
        "heldout_tokens": store.n_rows("heldout"),
        "model": store.config["model"],
        "corpus": store.config["corpus"],
    }
    print(json.dumps(summary, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="circuitsae", description="Sparse-autoencoder circuits on real language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    h = sub.add_parser(
        "harvest",
        help="record site activations over a corpus into a store",
        description="Run the model through nnsight over a corpus and store the activations "
        "of one or more sites (resumable).",
        epilog=EXAMPLES["harvest"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(h, HarvestConfig)
    h.set_defaults(func=_cmd_harvest)
    d = sub.add_parser(
        "demo",
        help="run the main job end to end on the embedded defaults",
        description="Harvest SmolLM2 activations on the embedded corpus (resumable).",
        epilog=EXAMPLES["demo"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    d.add_argument("--tokens", type=int, default=50_000, help="training tokens per site (default: 50000)")
    d.set_defaults(func=_cmd_demo)
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
