"""Other libraries' SAE folders: detect, read, write, refuse (the specification: :mod:`.core`).

:func:`detect_format` says what a folder is and :func:`read_foreign` reads a SAE Lens, dictionary_learning or
sparsify folder with that format's reader (:mod:`.saelens`, :mod:`.dictionary_learning`, :mod:`.sparsify`);
:func:`write_saelens` writes a SAE Lens v6 folder. ``read_foreign`` lives here, not in :mod:`.core`, because
every reader imports ``core``.
"""

from __future__ import annotations

from pathlib import Path

from circuitsae.dictionaries.base import Dictionary
from circuitsae.dictionaries.formats.core import (
    FORMAT,
    FORMATS,
    NORM_TOLERANCE,
    detect_format,
    looks_like_dictionary,
)
from circuitsae.dictionaries.formats.dictionary_learning import read_dictionary_learning
from circuitsae.dictionaries.formats.saelens import (
    SAELENS_ARCHITECTURES,
    SAELENS_LAYOUT_VERSION,
    read_saelens,
    write_saelens,
)
from circuitsae.dictionaries.formats.sparsify import read_sparsify
from circuitsae.errors import CircuitSAEError
from circuitsae.sites import dictionary_learning_site, module_site, site_to_hook, transformer_lens_site


def read_foreign(path: "str | Path", fmt: "str | None" = None) -> Dictionary:
    """Read a SAE Lens, dictionary_learning or sparsify folder (``fmt`` as :func:`detect_format` says)."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    readers = {"saelens": read_saelens, "dictionary_learning": read_dictionary_learning, "sparsify": read_sparsify}
    if fmt not in readers:
        raise CircuitSAEError(f"{path}: {fmt!r} is not another library's format (known: {', '.join(readers)})")
    return readers[fmt](path)


__all__ = [
    "FORMAT",
    "FORMATS",
    "NORM_TOLERANCE",
    "SAELENS_ARCHITECTURES",
    "SAELENS_LAYOUT_VERSION",
    "detect_format",
    "dictionary_learning_site",
    "looks_like_dictionary",
    "module_site",
    "read_dictionary_learning",
    "read_foreign",
    "read_saelens",
    "read_sparsify",
    "site_to_hook",
    "transformer_lens_site",
    "write_saelens",
]
