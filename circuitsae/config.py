"""Config dataclasses drive both the Python API and the CLI.

Each field carries its help text in ``metadata["help"]``; :func:`add_arguments`
turns the fields into ``--flags`` and :func:`from_arguments` builds the
dataclass back, so flags and API never drift apart.

Every field is checked before any work starts: each dataclass's ``__post_init__`` first calls
:func:`validate`, which checks every field against its annotation (a whole number where it is ``int``, a
finite number where it is ``float``, a bool, a string among ``choices``) and the bounds its ``option`` states
(``min``, ``max``, ``above``, and ``special`` values outside them with a meaning of their own), then checks
what concerns several fields at once. A bad value is one :class:`~circuitsae.errors.CircuitSAEError` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import types
import typing
from typing import Any, TypeVar

from circuitsae.errors import CircuitSAEError

T = TypeVar("T")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its CLI help text.

    ``positional="METAVAR"`` makes the field a positional argument of the command line (a sequence field takes
    one or more values); ``cli=False`` leaves it out of the command line; ``choices=`` restricts its values.
    Bounds, checked by :func:`validate` (for a sequence, on each element): ``min=`` and ``max=`` (inclusive),
    ``above=`` (exclusive lower bound), ``special=`` (values allowed outside the bounds, e.g. ``-1`` for
    "never").
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


_SUFFIXES = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}


def whole_number(text: str) -> "int | float":
    """A count from the command line: ``500``, ``1M``, ``500k``, ``2G``, ``2e6``. A value that is not a whole
    number is returned as a float, for :func:`validate` to refuse in its one line."""
    text = text.strip()
    scale = _SUFFIXES.get(text[-1:], 1) if len(text) > 1 else 1
    body = text[:-1] if scale != 1 else text
    try:
        return int(body) * scale
    except ValueError:
        pass
    try:
        value = float(body) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (write e.g. 500000, 500k or 1M)") from None
    return int(value) if math.isfinite(value) and value.is_integer() else value


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


def _number(name: str, v: Any, integer: bool) -> "int | float":
    """``v`` as a finite float, or as an int when ``integer`` (a float that is a whole number is accepted)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        kind = "a whole number" if integer else "a number"
        raise CircuitSAEError(f"{name} must be {kind}, got {v!r}")
    if not math.isfinite(float(v)):
        raise CircuitSAEError(f"{name} must be a finite number, got {v!r}")
    if integer:
        if isinstance(v, numbers.Integral):
            return int(v)
        if not float(v).is_integer():
            raise CircuitSAEError(f"{name} must be a whole number, got {v!r}")
        return int(v)
    return float(v)


def _check_bounds(name: str, v: "int | float", meta: Any) -> None:
    if v in meta.get("special", ()):
        return
    low, high, above = meta.get("min"), meta.get("max"), meta.get("above")
    special = meta.get("special", ())
    also = f" (or {' or '.join(map(str, special))})" if special else ""
    if low is not None and v < low:
        raise CircuitSAEError(f"{name} must be >= {low}{also}, got {v:g}")
    if above is not None and v <= above:
        raise CircuitSAEError(f"{name} must be > {above}{also}, got {v:g}")
    if high is not None and v > high:
        raise CircuitSAEError(f"{name} must be <= {high:g}, got {v:g}")


def _value(name: str, tp: Any, v: Any, meta: Any) -> Any:
    if tp is bool:
        if not isinstance(v, bool):
            raise CircuitSAEError(f"{name} must be true or false, got {v!r}")
        return v
    if tp in (int, float):
        v = _number(name, v, tp is int)
        _check_bounds(name, v, meta)
        return v
    if tp is str:
        if not isinstance(v, str):
            raise CircuitSAEError(f"{name} must be a string, got {v!r}")
        if "\0" in v:
            raise CircuitSAEError(f"{name} must not contain a NUL character")
    choices = meta.get("choices")
    if choices is not None and v not in choices:
        raise CircuitSAEError(f"{name} must be one of {', '.join(map(str, choices))}, got {v!r}")
    return v


def validate(obj: Any) -> None:
    """Check (and normalise) every field of dataclass ``obj`` against its annotation and its ``option`` bounds.

    Whole numbers become ``int``, numbers ``float``, sequences tuples (a lone string is a one-element tuple);
    ``None`` is accepted only where the annotation allows it. Raises one :class:`CircuitSAEError` line.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp, optional, seq = _base_type(hints[f.name])
        v = getattr(obj, f.name)
        if v is None:
            if not optional:
                raise CircuitSAEError(f"{f.name} needs a value")
            continue
        if seq:
            if isinstance(v, str):
                v = (v,)
            if not isinstance(v, (tuple, list)):
                raise CircuitSAEError(f"{f.name} must be a list of values, got {v!r}")
            v = tuple(_value(f.name, tp, x, f.metadata) for x in v)
        else:
            v = _value(f.name, tp, v, f.metadata)
        object.__setattr__(obj, f.name, v)


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
            type=whole_number if tp is int else tp,
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
