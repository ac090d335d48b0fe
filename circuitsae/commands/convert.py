"""``circuitsae convert IN OUT --to {circuitsae,saelens}``: read a dictionary in any format, write it in ours or SAE Lens's."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from circuitsae.config import option, validate
from circuitsae.dictionaries import Dictionary, load_dictionary, registry
from circuitsae.dictionaries.formats import write_saelens
from circuitsae.errors import CircuitSAEError
from circuitsae.io import LOCK_NAME, lock_folder, probe_folder

NAME = "convert"
HELP = "read a dictionary in any format; write it as circuitsae or SAE Lens"
DESCRIPTION = (
    "Read a circuitsae, SAE Lens, dictionary_learning or sparsify folder and write it to a new folder in "
    "circuitsae's or SAE Lens's (v6) format. Settings that cannot be read exactly are refused by name."
)
EXAMPLES = (
    "examples:\n  circuitsae convert runs/saes/resid.4-relu-c1 /tmp/sae-lens --to saelens\n"
    "  circuitsae convert my_saelens_sae runs/imported --to circuitsae     # SAE Lens, dictionary_learning, sparsify\n"
    "  circuitsae convert runs/saes/resid.4-gated-c2 /tmp/gated-as-jumprelu --to saelens --architecture jumprelu"
)


@dataclass
class ConvertConfig:
    """``circuitsae convert IN OUT --to {circuitsae,saelens}``."""

    source: str = option("", "the dictionary folder to read (any format load_dictionary reads)", positional="IN")
    out: str = option("", "the folder to write: new or empty (never overwritten)", positional="OUT")
    to: "str | None" = option(
        None, "format to write: circuitsae or saelens (no default: required)", choices=("circuitsae", "saelens")
    )
    architecture: "str | None" = option(
        None,
        "SAE Lens architecture to write (default: the dictionary's own; a Gated SAE can be written as jumprelu)",
        choices=registry.SAELENS_WRITES,
    )

    def __post_init__(self) -> None:
        validate(self)
        if self.to not in ("circuitsae", "saelens"):
            raise CircuitSAEError(f"convert needs --to circuitsae or --to saelens, got {self.to!r}")
        if self.architecture is not None and self.to != "saelens":
            raise CircuitSAEError("--architecture chooses a SAE Lens architecture: it needs --to saelens")
        if not self.source or not self.out:
            raise CircuitSAEError("convert needs an input folder and an output folder")


def convert(cfg: ConvertConfig) -> tuple[Path, Dictionary]:
    """Read ``cfg.source`` in whatever format it is and write it to the new folder ``cfg.out``.

    The output is locked against other writers and probed before the dictionary is read; a write that fails (a
    full disk) leaves nothing behind: the files written are removed, and the folder too if convert made it.
    """
    source, out = Path(cfg.source), Path(cfg.out)
    if source.exists() and (out.resolve() == source.resolve() or source.resolve() in out.resolve().parents):
        where = "is the input folder" if out.resolve() == source.resolve() else f"is inside the input folder {source}"
        raise CircuitSAEError(f"{out} {where}: convert writes a new folder, name one outside {source}")
    if out.exists() and not out.is_dir():
        raise CircuitSAEError(f"{out} exists and is not empty: convert never overwrites, name a new folder")
    with lock_folder(out, "convert"):
        if any(p.name != LOCK_NAME for p in out.iterdir()):
            raise CircuitSAEError(f"{out} exists and is not empty: convert never overwrites, name a new folder")
        probe_folder(out)
        dictionary = load_dictionary(cfg.source)
        try:
            if cfg.to == "saelens":
                write_saelens(dictionary, out, cfg.architecture)
            else:
                dictionary.save(out)
        except BaseException:
            for p in out.iterdir():
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.name != LOCK_NAME:
                    p.unlink(missing_ok=True)
            raise
    return out, dictionary


Config = ConvertConfig


class Converted(NamedTuple):
    """What ``convert`` wrote: the folder, the dictionary and the format."""

    out: Path
    dictionary: Dictionary
    to: str


def run(cfg: ConvertConfig, *, model: Any = None, progress: bool = True) -> Converted:
    """The command's work: :func:`convert` (no model is loaded)."""
    out, d = convert(cfg)
    return Converted(out, d, str(cfg.to))


def show(result: Converted) -> str:
    """What ``circuitsae convert`` prints."""
    out, d, to = result
    arch = json.loads((out / "cfg.json").read_text())["architecture"]  # as written (a Gated SAE may be a jumprelu)
    where = f", site {d.meta['site']}" if d.meta.get("site") else ""
    return f"wrote {out} ({to} {arch}, d={d.d}, d_dict={d.d_dict}{where})"
