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
