"""Config dataclasses drive both the Python API and the CLI.

Each field carries its help text in ``metadata["help"]``; :func:`add_arguments`
turns the fields into ``--flags`` and :func:`from_arguments` builds the
dataclass back, so flags and API never drift apart. Validation lives in each
dataclass's ``__post_init__`` and raises :class:`~circuitsae.errors.CircuitSAEError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its CLI help text.

    ``positional="METAVAR"`` makes the field a positional argument of the command line (a sequence field takes
    one or more values); ``cli=False`` leaves it out of the command line; ``choices=`` restricts its values.
    """
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple for sequence defaults")
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


MODEL_DTYPES = ("float32", "bfloat16", "float16")


def model_dtype_option() -> Any:
    """The ``--model-dtype`` field every command that loads a model shares."""
    return option(
        None,
        "dtype the model runs in: float32, bfloat16 or float16 (default: float32 on the CPU, bfloat16 on CUDA)",
        choices=MODEL_DTYPES,
    )


def _base_type(tp: Any) -> tuple[Any, bool, bool]:
    """(element type, optional?, sequence?) of an annotation."""
    optional = False
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        optional = type(None) in args
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)
    if typing.get_origin(tp) in (tuple, list):
        return args[0], optional, True
    return tp, optional, False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, _, seq = _base_type(hints[f.name])
        help_ = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            parser.add_argument(
                f.name, type=tp, nargs="+" if seq else None, metavar=f.metadata["positional"], help=help_
            )
            continue
        if tp is bool:
            if "default:" not in help_:  # a None default explains itself in the help ("default: on for CUDA")
                help_ = f"{help_} (default: {f.default})"
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
            continue
        default = f.default
        shown = " ".join(map(str, default)) if seq else default
        parser.add_argument(
            flag,
            type=tp,
            nargs="+" if seq else None,
            default=default,
            choices=f.metadata.get("choices"),
            metavar=f.name.upper() if not f.metadata.get("choices") else "{" + ",".join(f.metadata["choices"]) + "}",
            help=help_ if "default:" in help_ else f"{help_} (default: {shown})",
        )


def from_arguments(cls: type[T], args: argparse.Namespace) -> T:
    """Build dataclass ``cls`` from parsed arguments (sequences become tuples)."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if hasattr(args, f.name):
            v = getattr(args, f.name)
            values[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**values)
