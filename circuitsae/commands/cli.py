"""The ``circuitsae`` command line.

Every sub-command's flags come from the same config dataclass as the Python
API. A usage mistake or bad input prints one line, ``circuitsae: error: ...``,
and exits with status 2; Ctrl-C exits with 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from circuitsae import distributed
from circuitsae.config import add_arguments, from_arguments
from circuitsae.errors import CircuitSAEError
from circuitsae.io import disk_full

#: the commands, in the order ``circuitsae --help`` lists them: each module has NAME, HELP, DESCRIPTION,
#: EXAMPLES, Config (the dataclass its flags come from), run(cfg, *, model, progress) and show(result)
COMMANDS = ("harvest", "train", "evaluate", "ioi", "feature", "tree", "circuit", "convert", "demo")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CircuitSAEError(f"{message} (see {self.prog} --help)")


@contextlib.contextmanager
def _one_line_warnings() -> Any:
    """Print each warning raised inside as one line, ``circuitsae: warning: ...``, as it is raised."""

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        print(f"circuitsae: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = show
        yield


def command_modules() -> list[ModuleType]:
    """The command modules, imported."""
    return [importlib.import_module(f"circuitsae.commands.{name}") for name in COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    """The ``circuitsae`` parser: one sub-command per command module, flags generated from its Config."""
    parser = _Parser(
        prog="circuitsae",
        description="Sparse-autoencoder circuits on real language models.",
        epilog="a typical session (each command resumes if interrupted; COMMAND --help for its flags):\n"
        "  circuitsae harvest --sites resid.3 resid.4 --tokens 200000 --out runs/acts\n"
        "  circuitsae train --store runs/acts --arch relu gated --out runs/saes\n"
        "  circuitsae eval runs/saes\n"
        "  circuitsae ioi runs/saes --prompts 20 --out runs/ioi\n"
        "  circuitsae feature resid.4:123 --dictionaries runs/saes --arch relu\n"
        "  circuitsae tree resid.4:123 --dictionaries runs/saes --arch relu --depth 1\n"
        "  circuitsae demo                  # all of it on the embedded defaults, with report.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in command_modules():
        p = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=module.DESCRIPTION,
            epilog=module.EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(p, module.Config)
        p.set_defaults(module=module)
    return parser


def _run(module: ModuleType, args: argparse.Namespace) -> None:
    cfg = from_arguments(module.Config, args)
    with _one_line_warnings():
        result = module.run(cfg)
    text = module.show(result)
    if text:
        print(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return 0, 2 on a usage error, bad input or a full disk (one line on stderr), 130 on
    Ctrl-C."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        try:
            _run(args.module, args)
        finally:
            distributed.shutdown()
    except CircuitSAEError as e:
        print(f"circuitsae: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk wherever it strikes (a log line, a plot) is one line, not a traceback
        full = disk_full(e)
        if full is None:
            raise
        print(f"circuitsae: error: {full}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("circuitsae: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


__all__ = ["COMMANDS", "build_parser", "command_modules", "main"]
