"""The architecture registry: every dictionary class, listed once, and what the library asks of them.

An architecture declares everything about itself on its class (:mod:`circuitsae.dictionaries.base`):

==================  ==============================================================================================
``architecture``    its name (``cfg.json``, ``--arch``, run folder names)
``training``        :class:`~circuitsae.dictionaries.base.TrainingDefaults`: lr, Adam betas, the default coefficient,
                    whether the coefficient is k (trainable classes only)
``resamples_dead``  whether the trainer resamples its dead features
``for_training``    how a run makes a fresh one from the run's settings
``reads``           the other formats' names it is read from (``{"saelens": ("standard",), ...}``)
``from_parts``      how a reader's weights become one
``saelens_writes``  the SAE Lens architectures it can be written as, its default first
``saelens_form``    its tensors as such
==================  ==============================================================================================

The trainer (defaults, ``--arch`` choices, making a run), the readers of other formats (which class a file
becomes), ``circuitsae convert``'s choices and :func:`~circuitsae.dictionaries.load_dictionary` ask this module,
never a table of their own. The classes are listed below; nothing registers itself on import. A new
architecture is one class and one :func:`register` call (``tests/test_registry.py`` trains, saves, loads,
converts and patches one defined in the test).

Where two registered classes read the same name of another format, the first listed reads it, unless the file
itself names the other (a circuitsae round trip through SAE Lens records its class).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from circuitsae.dictionaries.base import Dictionary, TrainableDictionary
from circuitsae.dictionaries.batchtopk import BatchTopKSAE
from circuitsae.dictionaries.gated import GatedSAE
from circuitsae.dictionaries.jumprelu import JumpReLUSAE
from circuitsae.dictionaries.linear import IdentityDictionary, PCADictionary
from circuitsae.dictionaries.relu import ReluSAE
from circuitsae.dictionaries.topk import TopKSAE
from circuitsae.errors import CircuitSAEError

#: the library's own architectures, in the order names are listed (``--arch`` choices, error messages)
BUILTIN: tuple[type[Dictionary], ...] = (
    ReluSAE,
    GatedSAE,
    TopKSAE,
    BatchTopKSAE,
    JumpReLUSAE,
    PCADictionary,
    IdentityDictionary,
)

_classes: list[type[Dictionary]] = list(BUILTIN)


def register(cls: type[Dictionary]) -> type[Dictionary]:
    """Add an architecture (after the built-in ones); its ``architecture`` name must be new. Returns ``cls``."""
    name = getattr(cls, "architecture", None)
    if not (isinstance(cls, type) and issubclass(cls, Dictionary)) or not isinstance(name, str) or not name:
        raise CircuitSAEError(f"{cls!r} is not a Dictionary class with an architecture name")
    if name in names():
        raise CircuitSAEError(f"architecture {name!r} is registered already ({get(name).__name__})")
    if issubclass(cls, TrainableDictionary) and not hasattr(cls, "training"):
        raise CircuitSAEError(f"{cls.__name__} is trainable but declares no training defaults")
    _classes.append(cls)
    return cls


def unregister(name: str) -> None:
    """Remove a registered architecture that is not built in (a test's toy)."""
    cls = get(name)
    if cls in BUILTIN:
        raise CircuitSAEError(f"{name!r} is built in and stays registered")
    _classes.remove(cls)


def classes() -> tuple[type[Dictionary], ...]:
    """Every registered class, built-in ones first."""
    return tuple(_classes)


def names() -> tuple[str, ...]:
    """Every registered architecture's name."""
    return tuple(c.architecture for c in _classes)


def get(name: str) -> type[Dictionary]:
    """The class named ``name``; a one-line error naming the known ones."""
    for c in _classes:
        if c.architecture == name:
            return c
    raise CircuitSAEError(f"unknown architecture {name!r} (known: {', '.join(names())})")


def trainable() -> tuple[type[TrainableDictionary], ...]:
    """The classes the trainer can train."""
    return tuple(c for c in _classes if issubclass(c, TrainableDictionary))


def get_trainable(name: str) -> type[TrainableDictionary]:
    """The trainable class named ``name``; a one-line error naming the trainable ones."""
    for c in trainable():
        if c.architecture == name:
            return c
    known = ", ".join(c.architecture for c in trainable())
    raise CircuitSAEError(f"unknown architecture {name!r}: choose from {known}")


def read_names(fmt: str) -> tuple[str, ...]:
    """The names of format ``fmt`` some registered class is read from, each once, in registry order."""
    return tuple(dict.fromkeys(n for c in _classes for n in c.reads.get(fmt, ())))


def saelens_writes() -> tuple[str, ...]:
    """The SAE Lens architectures some registered class can be written as, each once."""
    return tuple(dict.fromkeys(n for c in _classes for n in c.saelens_writes))


def reader(fmt: str, name: str, preferred: "str | None" = None) -> type[Dictionary]:
    """The class a file of format ``fmt`` that calls itself ``name`` is read into.

    The first registered class that reads it, or ``preferred`` (an architecture name the file records, e.g.
    a circuitsae round trip's) if that class reads it too.
    """
    readers = [c for c in _classes if name in c.reads.get(fmt, ())]
    if not readers:
        raise CircuitSAEError(f"no registered architecture reads {fmt} {name!r}")
    return next((c for c in readers if c.architecture == preferred), readers[0])


class Names(Sequence):
    """A live view of names from the registry (``--arch``'s ``choices``): it reads the registry when asked,
    so a class registered after the command line's options were declared is among them."""

    def __init__(self, source: Callable[[], tuple[str, ...]]) -> None:
        self._source = source

    def __getitem__(self, i):  # type: ignore[override]
        return self._source()[i]

    def __len__(self) -> int:
        return len(self._source())

    def __iter__(self) -> Iterator[str]:
        return iter(self._source())

    def __contains__(self, name: object) -> bool:
        return name in self._source()

    def __repr__(self) -> str:
        return repr(self._source())


#: the names ``circuitsae train --arch`` accepts
TRAINABLE_NAMES = Names(lambda: tuple(c.architecture for c in trainable()))
#: the architectures ``circuitsae convert --to saelens --architecture`` accepts
SAELENS_WRITES = Names(saelens_writes)

__all__ = [
    "BUILTIN",
    "SAELENS_WRITES",
    "TRAINABLE_NAMES",
    "Names",
    "classes",
    "get",
    "get_trainable",
    "names",
    "read_names",
    "reader",
    "register",
    "saelens_writes",
    "trainable",
    "unregister",
]
