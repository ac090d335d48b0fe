"""Finding saved dictionaries on disk: a folder of one, or a training output folder holding many."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from circuitsae.dictionaries import Dictionary, load_dictionary
from circuitsae.dictionaries.formats import looks_like_dictionary
from circuitsae.errors import CircuitSAEError
from circuitsae.sites import Site


def dictionary_folders(paths: "tuple[str, ...] | list[str]") -> list[Path]:
    """Expand each path: a dictionary folder itself, or a folder of them (a training output)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if looks_like_dictionary(p):
            found.append(p)
        elif p.is_dir() and any(looks_like_dictionary(c) for c in p.iterdir()):
            found.extend(sorted(c for c in p.iterdir() if looks_like_dictionary(c)))
        else:
            raise CircuitSAEError(f"{p} is neither a saved dictionary nor a folder of them")
    if not found:
        raise CircuitSAEError("no dictionary given")
    return found


def select_dictionaries(
    paths: Sequence[str], arch: "str | None" = None, coefficient: "float | None" = None
) -> dict[str, Dictionary]:
    """One dictionary per site from folders (or training output folders), filtered by architecture/coefficient.

    Sites come back in forward order. Several candidates left for one site is an error naming them.
    """
    by_site: dict[str, list[tuple[Path, Dictionary]]] = {}
    for p in dictionary_folders(tuple(paths)):
        d = load_dictionary(p)
        coef = d.meta.get("training", {}).get("coefficient")
        if (arch and d.architecture != arch) or (coefficient is not None and coef != coefficient):
            continue
        if "site" not in d.meta:
            raise CircuitSAEError(f"{p} does not record its site")
        by_site.setdefault(d.meta["site"], []).append((p, d))
    if not by_site:
        raise CircuitSAEError(f"no dictionary in {', '.join(paths)} matches arch={arch} coefficient={coefficient}")
    for site, found in by_site.items():
        if len(found) > 1:
            names = ", ".join(p.name for p, _ in found)
            raise CircuitSAEError(
                f"{len(found)} dictionaries at {site} ({names}): choose one with --arch/--coefficient"
            )
    order = sorted(by_site, key=lambda s: Site.parse(s).sort_key())
    return {s: by_site[s][0][1] for s in order}


__all__ = ["dictionary_folders", "select_dictionaries"]
