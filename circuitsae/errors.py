"""The one exception type users are meant to read.

Every mistake a user can make (an unknown model or site, an empty corpus, an
incompatible activation store, a damaged shard, ...) is raised as
:class:`CircuitSAEError` with a message of one sentence that says what is wrong
and, where there is one, what to do. The CLI prints that sentence and exits with
status 2 instead of showing a traceback.
"""

from __future__ import annotations


class CircuitSAEError(ValueError):
    """A user-facing error whose message is a single, self-contained line."""


class NothingToPatch(CircuitSAEError):
    """No feature of a dictionary differs between the base and target prompts (a dictionary whose features are
    all dead on them, say): there is no curve to draw. Experiments over many dictionaries skip it and say so."""
