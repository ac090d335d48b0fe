"""Data: real text corpora, the on-disk activation store, its fast reader, and harvesting into it.

- :mod:`~circuitsae.data.corpora` — the embedded corpora (and folders, files, HF datasets) cut into contexts;
- :mod:`~circuitsae.data.store` — the activation store (checksummed shards, atomic writes, resumable);
- :mod:`~circuitsae.data.reader` — shuffled batches from a store without copying it;
- :mod:`~circuitsae.data.harvest` — record site activations over a corpus through nnsight into a store.

The corpus functions are re-exported here (``circuitsae.data.contexts``, ``circuitsae.data.load_corpus``).
"""

from circuitsae.data.corpora import (
    DEFAULT_CORPUS,
    SPLITS,
    Corpus,
    Document,
    content_key,
    contexts,
    deduplicate,
    documents,
    load_corpus,
    split_documents,
)

__all__ = [
    "DEFAULT_CORPUS",
    "SPLITS",
    "Corpus",
    "Document",
    "content_key",
    "contexts",
    "deduplicate",
    "documents",
    "load_corpus",
    "split_documents",
]
