"""Saved folders checked before they are trusted: the manifest, the saved values, the tensors' header.

``manifest.json`` lists every file a writer put in a dictionary folder with its size and sha256::

    {"format": "circuitsae-manifest/1",
     "files": {"sae.safetensors": {"bytes": 4216, "sha256": "9f2c..."},
               "cfg.json":        {"bytes": 611,  "sha256": "04ab..."}}}

:func:`write_folder` writes the files, then the manifest, then the commit marker (``cfg.json``: a folder that
has it is complete), each atomically; :func:`check_manifest` checks sizes first (cheap), then sha256 unless
the caller or ``CIRCUITSAE_VERIFY=0`` skips the hashes.

A saved config is checked value by value before anything is built from it (:func:`check_arguments`,
:func:`positive_int`, :func:`flag`, :func:`optional`): integers are ints (not ``"512"``, not ``true``), floats
finite, flags booleans, sizes at least 1. :func:`header` reads a safetensors file's names, shapes and dtypes
without reading its tensors, so the shapes a config implies are compared with the file before any tensor of
those shapes exists; :func:`check_finite` refuses NaN and inf naming the tensor.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import safetensors
import torch

from circuitsae.errors import CircuitSAEError
from circuitsae.io import atomic_write, sha256_file

#: the file every folder this library writes carries
MANIFEST = "manifest.json"
#: the manifest layout's name and version
MANIFEST_FORMAT = "circuitsae-manifest/1"
#: ``CIRCUITSAE_VERIFY=0`` skips the sha256 of saved dictionaries (sizes are still checked)
VERIFY_VARIABLE = "CIRCUITSAE_VERIFY"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHANGED = "(the file was changed or damaged after it was saved)"


# -- the manifest ----------------------------------------------------------------------------------------------
def write_folder(path: Path, files: dict[str, bytes], last: str) -> None:
    """Write ``files`` into ``path``, then ``manifest.json``, then ``files[last]`` (the commit marker).

    An existing ``last`` is removed first, so a folder interrupted while it is rewritten reads as incomplete.
    """
    (path / last).unlink(missing_ok=True)
    entries: dict[str, dict[str, Any]] = {}
    for name, data in files.items():
        if name != last:
            n, sha = atomic_write(path / name, data)
            entries[name] = {"bytes": n, "sha256": sha}
    entries[last] = {"bytes": len(files[last]), "sha256": hashlib.sha256(files[last]).hexdigest()}
    manifest = {"format": MANIFEST_FORMAT, "files": entries}
    atomic_write(path / MANIFEST, json.dumps(manifest, indent=1).encode())
    atomic_write(path / last, files[last])


def check_manifest(path: Path, verify: bool = True) -> bool:
    """Check ``path/manifest.json``'s files: sizes, then sha256. False if there is no manifest.

    ``verify=False`` or ``CIRCUITSAE_VERIFY=0`` skips the sha256 (not the sizes) and says so in one warning.
    """
    where = path / MANIFEST
    if not where.is_file():
        return False
    manifest = read_json(where)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise CircuitSAEError(f"{where} is not a circuitsae manifest (format {MANIFEST_FORMAT!r} with files)")
    for name, entry in files.items():
        ok = isinstance(entry, dict) and type(entry.get("bytes")) is int and entry["bytes"] >= 0
        if not (ok and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
            raise CircuitSAEError(f"{where}: the entry for {_shown(name)} lacks bytes or a sha256")
        if not name or Path(name).name != name or name in (".", ".."):
            raise CircuitSAEError(f"{where} names {_shown(name)}, which is not a file of this folder")
    for name, entry in files.items():  # sizes first: cheap, and what a truncated copy gets wrong
        f = path / name
        if not f.is_file():
            raise CircuitSAEError(f"{f} is missing but {MANIFEST} lists it (the folder is incomplete or was changed)")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise CircuitSAEError(f"{f}: {size} bytes but {MANIFEST} says {entry['bytes']} {_CHANGED}")
    env = os.environ.get(VERIFY_VARIABLE, "").strip().lower()
    skip = "verify=False" if not verify else f"{VERIFY_VARIABLE}={env}" if env in ("0", "false", "no") else None
    if skip:
        warnings.warn(f"{path}: sha256 of its files not checked ({skip}); sizes were", UserWarning, stacklevel=3)
        return True
    for name, entry in files.items():
        if sha256_file(path / name) != entry["sha256"]:
            raise CircuitSAEError(f"{path / name}: sha256 differs from {MANIFEST} {_CHANGED}")
    return True


def read_json(p: Path) -> Any:
    """A JSON file's value; one line if it is not JSON (NaN and Infinity are read as floats)."""
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CircuitSAEError(f"{p} is not valid JSON ({e})") from None
    except RecursionError:
        raise CircuitSAEError(f"{p} is nested too deeply to be a config") from None


# -- values of a saved config ----------------------------------------------------------------------------------
def positive_int(cfg: dict, key: str, where: str, default: Any = ...) -> int:
    """``cfg[key]`` as an integer >= 1 (an int, or a float that is one: 512.0); ``default`` if absent or null."""
    v = cfg.get(key)
    if v is None and default is not ...:
        return default
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    if type(v) is not int or v < 1:
        raise CircuitSAEError(f"{where}: {key!r} must be a positive integer, got {_shown(v)}")
    return v


def flag(cfg: dict, key: str, where: str, default: bool) -> bool:
    """``cfg[key]`` as a boolean (``true``/``false``; absent or null: ``default``)."""
    v = cfg.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise CircuitSAEError(f"{where}: {key!r} must be true or false, got {_shown(v)}")
    return v


def optional(cfg: dict, key: str, where: str, kind: type, default: Any = None) -> Any:
    """``cfg[key]`` if it is a ``kind`` (``str``, ``int``, ``dict``, ...), ``default`` if absent or null."""
    v = cfg.get(key)
    if v is None:
        return default
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise CircuitSAEError(f"{where}: {key!r} must be {_KINDS.get(kind, kind.__name__)}, got {_shown(v)}")
    return v


_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
          list: "a list"}  # fmt: skip


def _shown(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_arguments(cls: type, cfg: dict, where: str, partial: bool = False) -> dict[str, Any]:
    """The constructor arguments of ``cls`` found in ``cfg``, each checked against its annotation.

    ``int``: an int (not a bool or a string) >= 1; ``float``: a finite number; ``bool``: true or false;
    ``None`` where the annotation allows it. Arguments whose annotation names other types are passed as they
    are. A required argument missing from ``cfg`` is refused unless ``partial``.
    """
    args: dict[str, Any] = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name not in cfg:
            if p.default is p.empty and not partial:
                raise CircuitSAEError(f"{where} lacks the key {name!r}")
            continue
        v, kinds = cfg[name], _annotation(p.annotation)
        if kinds is not None and not _fits(v, kinds):
            wanted = " or ".join(_WANTED[k] for k in kinds)
            raise CircuitSAEError(f"{where}: {name!r} must be {wanted}, got {_shown(v)}")
        args[name] = v
    return args


_WANTED = {"int": "an integer >= 1", "float": "a finite number", "bool": "true or false", "str": "a string",
           "None": "null"}  # fmt: skip


def _annotation(a: Any) -> "tuple[str, ...] | None":
    """``"int | None"`` as ``("int", "None")``; None for an annotation naming other types (or none)."""
    if a is inspect.Parameter.empty:
        return None
    names = tuple(
        n.strip().strip("'\"") for n in str(a if isinstance(a, str) else getattr(a, "__name__", a)).split("|")
    )
    return names if all(n in _WANTED for n in names) else None


def _fits(v: Any, kinds: tuple[str, ...]) -> bool:
    if v is None:
        return "None" in kinds
    if isinstance(v, bool):
        return "bool" in kinds
    if isinstance(v, int):
        return ("int" in kinds and v >= 1) or "float" in kinds
    if isinstance(v, float):
        return "float" in kinds and math.isfinite(v)
    return isinstance(v, str) and "str" in kinds


# -- tensors ---------------------------------------------------------------------------------------------------
def header(p: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """A safetensors file's tensors as ``{name: (shape, dtype)}`` from its header (no tensor is read).

    safetensors checks that every shape and dtype agrees with the bytes the file holds.
    """
    try:
        with safetensors.safe_open(p, "pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), str(f.get_slice(k).get_dtype())) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a bad header
        raise CircuitSAEError(f"{p} is not a readable safetensors file ({_first_line(e)})") from None


def is_float_dtype(dtype: str) -> bool:
    """Whether a safetensors dtype name (``F32``, ``BF16``, ``F8_E4M3``, ``I64``, ...) is a floating point one."""
    return dtype.startswith(("F", "BF"))


def check_finite(where: str, tensors: dict[str, torch.Tensor], minus_infinity: tuple[str, ...] = ()) -> None:
    """Refuse, in one line naming it, a floating point tensor that holds NaN or inf (−inf where ``minus_infinity``
    names it is allowed)."""
    for name, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            t = t if t.element_size() >= 2 or t.is_complex() else t.float()
            finite = torch.isfinite(t) | (t == -math.inf) if name in minus_infinity else torch.isfinite(t)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise CircuitSAEError(f"{where}: {name} holds NaN or inf ({bad} of its {t.numel()} values)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


__all__ = [
    "MANIFEST",
    "MANIFEST_FORMAT",
    "VERIFY_VARIABLE",
    "check_arguments",
    "check_finite",
    "check_manifest",
    "flag",
    "header",
    "is_float_dtype",
    "optional",
    "positive_int",
    "read_json",
    "write_folder",
]
