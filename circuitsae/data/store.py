"""On-disk activation store: a folder of shards plus ``meta.json``.

Layout of a store folder::

    meta.json                       what was harvested and how (see below)
    train-00000.tokens.npy          int32 [contexts, ctx_len]: the token ids
    train-00000.resid.3.npy         [rows, d] activations of one site
    train-00000.json                manifest: rows, contexts, bytes and sha256
    ...                               of every file of the shard
    heldout-00000.*                 the held-out split, never used for training

Rows of a shard are ``(context, position)`` pairs in row-major order over the
shard's contexts and the kept positions ``first_position .. ctx_len - 1``
(``first_position`` is 1 when the start token is excluded), so every stored
activation can be traced back to its token and text (:meth:`ActivationStore.locate`).

**Integrity.** Every file is written to a temporary name, flushed to disk and
renamed into place; a shard's manifest is written last and is its commit
marker, so a shard without a manifest does not exist. ``meta.json`` says
``"complete": true`` only once every shard is in. Opening a store checks the
size of every file; reading a shard checks its sha256 the first time this
process reads that file (hashed straight from the page cache, no copy), and
again only if the file's size, inode or modification/change time moved since;
the data itself is then memory-mapped, never copied whole. A failing check raises
:class:`~circuitsae.errors.CircuitSAEError` naming the shard and file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from circuitsae.data.reader import reference_batches, shuffled_batches
from circuitsae.errors import CircuitSAEError
from circuitsae.io import LOCK_NAME, atomic_write, sha256_file, writer_tag

FORMAT = "circuitsae-activations/1"
SPLITS = ("train", "heldout")

#: storage dtype name -> (numpy dtype on disk, torch dtype it represents).
#: bfloat16 has no numpy type; its bits are stored as uint16.
STORE_DTYPES: dict[str, tuple[Any, torch.dtype]] = {
    "float16": (np.float16, torch.float16),
    "bfloat16": (np.uint16, torch.bfloat16),
    "float32": (np.float32, torch.float32),
}


#: files whose sha256 this process has checked: (path, inode, size, mtime, ctime) -> the digest found
_VERIFIED: dict[tuple, str] = {}
_VERIFIED_LOCK = threading.Lock()


def _file_identity(path: Path) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def to_numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor in the storage representation of ``dtype``."""
    np_dtype, torch_dtype = STORE_DTYPES[dtype]
    x = x.detach().to("cpu", torch_dtype).contiguous()
    if torch_dtype is torch.bfloat16:
        return x.view(torch.uint16).numpy()
    return x.numpy()


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of :func:`to_numpy` (shares memory where it can)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if STORE_DTYPES[dtype][1] is torch.bfloat16 else t


def shard_stem(split: str, index: int) -> str:
    """File stem of shard ``index`` of ``split``: ``train-00003``."""
    return f"{split}-{index:05d}"


class StoreWriter:
    """Creates a store or resumes an interrupted one; writes shards atomically.

    ``meta`` must hold ``config`` (the settings that decide the contents),
    ``d``, ``sites``, ``dtype`` and ``splits``. An existing store in ``root`` is
    resumed only if those agree; otherwise nothing is touched and a
    :class:`CircuitSAEError` lists the differences.
    """

    IDENTITY = ("format", "config", "d", "sites", "dtype", "splits", "rows_per_context", "first_position")
    #: what a store written before a config key existed had there (so it still resumes)
    CONFIG_DEFAULTS = {"model_dtype": "float32"}

    def __init__(self, root: "str | Path", meta: dict, *, create: bool = True) -> None:
        self.root = Path(root)
        # through JSON once, so that it compares equal to what was written before
        self.meta = json.loads(json.dumps({"format": FORMAT, **meta, "complete": False}))
        if not create and not (self.root / "meta.json").is_file():
            raise CircuitSAEError(
                f"{str(self.root)!r} has no meta.json although rank 0 wrote it: is this folder on storage every "
                "node sees? (the store's folder must be shared)"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".tmp-{writer_tag()}-{os.getpid()}-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise CircuitSAEError(f"cannot write to output folder {str(self.root)!r}: {e.strerror or e}") from None
        meta_path = self.root / "meta.json"
        resuming = meta_path.is_file()
        if resuming:
            self._check_compatible(meta_path)
        elif any(p for p in self.root.iterdir() if not p.name.startswith(".tmp-") and p.name != LOCK_NAME):
            raise CircuitSAEError(
                f"output folder {str(self.root)!r} is not empty and holds no activation store; "
                "choose an empty or new folder"
            )
        for stale in self.root.glob(f".tmp-{writer_tag()}-*"):  # left by a killed writer of this host and rank
            if not stale.name.startswith(f".tmp-{writer_tag()}-{os.getpid()}-"):
                stale.unlink(missing_ok=True)
        if not resuming:
            atomic_write(meta_path, json.dumps(self.meta, indent=2).encode())

    def _check_compatible(self, meta_path: Path) -> None:
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise CircuitSAEError(f"{meta_path} is unreadable; refusing to overwrite the folder") from None
        diffs = []
        for key in self.IDENTITY:
            a, b = old.get(key), self.meta.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                if key == "config":
                    a = {**self.CONFIG_DEFAULTS, **a}
                diffs += [
                    f"{key}.{k}: {a.get(k)!r} there, {b.get(k)!r} now"
                    for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)
                ]
            elif a != b:
                diffs.append(f"{key}: {a!r} there, {b!r} now")
        if diffs:
            raise CircuitSAEError(
                f"{str(self.root)!r} holds an incompatible activation store ({'; '.join(diffs[:4])}); "
                "nothing was changed: use another output folder or the same settings"
            )

    def has_shard(self, split: str, index: int) -> bool:
        """True when the shard is committed and its files have the recorded sizes."""
        manifest = self.root / f"{shard_stem(split, index)}.json"
        if not manifest.is_file():
            return False
        _check_sizes(self.root, json.loads(manifest.read_text()))
        return True

    def write_shard(
        self,
        split: str,
        index: int,
        first_context: int,
        tokens: torch.Tensor,
        acts: "dict[str, torch.Tensor | np.ndarray]",
    ) -> None:
        """Write one shard: ``tokens`` ``[contexts, ctx_len]``, ``acts[site]`` ``[rows, d]``.

        Activations may be tensors or arrays already in the storage representation
        (:func:`to_numpy`), which avoids a copy.
        """
        stem = shard_stem(split, index)
        files: dict[str, dict] = {}
        arrays = {"tokens": tokens.to(torch.int32).cpu().numpy()}
        arrays.update(
            {site: a if isinstance(a, np.ndarray) else to_numpy(a, self.meta["dtype"]) for site, a in acts.items()}
        )
        for key, arr in arrays.items():
            name = f"{stem}.{key}.npy"
            n_bytes, digest = atomic_write(self.root / name, arr)
            files[key] = {"name": name, "bytes": n_bytes, "sha256": digest, "shape": list(arr.shape)}
        rows = {int(a.shape[0]) for k, a in arrays.items() if k != "tokens"}
        manifest = {
            "split": split,
            "index": index,
            "first_context": first_context,
            "contexts": int(tokens.shape[0]),
            "rows": rows.pop(),
            "files": files,
        }
        atomic_write(self.root / f"{stem}.json", json.dumps(manifest, indent=1).encode())

    def finish(self, **summary: Any) -> None:
        """Mark the store complete (only after every shard is written, by every writer).

        Temporary files left by killed writers of any host or rank are removed here, when no writer is left.
        """
        for split, info in self.meta["splits"].items():
            missing = [i for i in range(info["shards"]) if not self.has_shard(split, i)]
            if missing:
                raise CircuitSAEError(f"cannot finish store {self.root}: {split} shards {missing[:5]} are missing")
        self.meta.update(summary, complete=True)
        atomic_write(self.root / "meta.json", json.dumps(self.meta, indent=2).encode())
        for stale in self.root.glob(".tmp-*"):
            stale.unlink(missing_ok=True)


def _check_sizes(root: Path, manifest: dict) -> None:
    stem = shard_stem(manifest["split"], manifest["index"])
    for f in manifest["files"].values():
        path = root / f["name"]
        size = path.stat().st_size if path.is_file() else None
        if size != f["bytes"]:
            found = "is missing" if size is None else f"has {size} bytes, expected {f['bytes']}"
            raise CircuitSAEError(
                f"shard {stem} of store {root} is damaged: {f['name']} {found}; delete {stem}.* "
                "and re-run the same harvest to rebuild it"
            )


class ActivationStore:
    """Read access to a complete store: shards, shuffled batches, held-out data, token ids.

    Args:
        root: the store folder.
        allow_incomplete: open a store whose harvest has not finished (reads
            only the committed shards); by default that is refused.
    """

    def __init__(self, root: "str | Path", allow_incomplete: bool = False) -> None:
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise CircuitSAEError(f"{str(self.root)!r} is not an activation store (no meta.json)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            raise CircuitSAEError(f"{meta_path} is damaged (not valid JSON)") from None
        if self.meta.get("format") != FORMAT:
            raise CircuitSAEError(f"{meta_path} has format {self.meta.get('format')!r}, expected {FORMAT!r}")
        if not self.meta.get("complete") and not allow_incomplete:
            raise CircuitSAEError(
                f"store {str(self.root)!r} is incomplete (its harvest was interrupted): re-run the "
                "same harvest command to finish it"
            )
        self.manifests: dict[str, list[dict]] = {}
        for split in SPLITS:
            found = []
            for i in range(self.meta["splits"][split]["shards"]):
                path = self.root / f"{shard_stem(split, i)}.json"
                if not path.is_file():
                    if allow_incomplete:
                        continue
                    raise CircuitSAEError(f"store {self.root} lacks shard {shard_stem(split, i)}")
                manifest = json.loads(path.read_text())
                _check_sizes(self.root, manifest)
                found.append(manifest)
            self.manifests[split] = found

    # -- description ---------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        return list(self.meta["sites"])

    @property
    def d(self) -> int:
        return int(self.meta["d"])

    @property
    def dtype(self) -> str:
        return str(self.meta["dtype"])

    @property
    def storage_dtype(self) -> torch.dtype:
        """The torch dtype the activations are stored in."""
        return STORE_DTYPES[self.dtype][1]

    @property
    def config(self) -> dict:
        return dict(self.meta["config"])

    @property
    def fingerprint(self) -> str:
        """The store's identity: a digest of what was harvested and the sha256 of every file of every shard.

        Two copies of one store (moved, copied to another machine) have the same fingerprint; any other store,
        even one harvested with other settings into the same folder, has another.
        """
        h = hashlib.sha1(json.dumps([self.meta["config"], self.sites, self.d, self.dtype], sort_keys=True).encode())
        for split in SPLITS:
            for m in self.manifests[split]:
                h.update("".join(f["sha256"] for f in m["files"].values()).encode())
        return h.hexdigest()[:16]

    def n_rows(self, split: str = "train") -> int:
        """Number of stored activation vectors (tokens) per site in ``split``."""
        return sum(m["rows"] for m in self._split(split))

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.root)!r}, model={self.config['model']!r}, sites={self.sites}, "
            f"d={self.d}, train={self.n_rows('train')}, heldout={self.n_rows('heldout')}, dtype={self.dtype})"
        )

    def __getitem__(self, site: str) -> "SiteView":
        return SiteView(self, self._site(site))

    def _site(self, site: Any) -> str:
        site = str(site)
        if site not in self.meta["sites"]:
            raise CircuitSAEError(f"store {self.root} has no site {site!r}; it holds {', '.join(self.sites)}")
        return site

    def _split(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise CircuitSAEError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        return self.manifests[split]

    # -- shards --------------------------------------------------------------
    def _read(self, manifest: dict, key: str, verify: bool) -> np.ndarray:
        """One file of a shard, memory-mapped (copy-on-write: writing to it never touches the file).

        With ``verify`` its sha256 is checked first, unless this process already found it good
        and the file has not changed since (see the module docstring).
        """
        f = manifest["files"][key]
        path = self.root / f["name"]
        if verify:
            self._check_sha256(manifest, key)
        return np.load(path, mmap_mode="c", allow_pickle=False)

    def _check_sha256(self, manifest: dict, key: str, force: bool = False) -> None:
        f = manifest["files"][key]
        path = self.root / f["name"]
        before = _file_identity(path)
        with _VERIFIED_LOCK:
            if not force and _VERIFIED.get(before) == f["sha256"]:
                return
        found = sha256_file(path)
        if found != f["sha256"]:
            raise CircuitSAEError(
                f"shard {shard_stem(manifest['split'], manifest['index'])} of store {self.root} is damaged: "
                f"{f['name']} fails its checksum; delete that shard's files and re-run the same harvest"
            )
        if _file_identity(path) == before:  # not changed while it was hashed
            with _VERIFIED_LOCK:
                _VERIFIED[before] = found

    def shard(self, site: str, split: str = "train", index: int = 0, verify: bool = True) -> torch.Tensor:
        """Activations ``[rows, d]`` of one shard, in the storage dtype."""
        return from_numpy(self._read(self._split(split)[index], self._site(site), verify), self.dtype)

    def verify(self) -> None:
        """Hash every file of every shard now, even those already found good (raises on the first bad one)."""
        for split in SPLITS:
            for m in self._split(split):
                for key in m["files"]:
                    self._check_sha256(m, key, force=True)

    # -- reading -------------------------------------------------------------
    def batches(
        self,
        site: "str | Sequence[str]",
        batch_size: int,
        *,
        epochs: int = 1,
        seed: int = 0,
        split: str = "train",
        device: "str | torch.device" = "cpu",
        dtype: torch.dtype = torch.float32,
        buffer_rows: int = 1 << 18,
        drop_last: bool = False,
        verify: bool = True,
        skip: int = 0,
        prefetch: int = 4,
        reader: str = "fast",
        part: tuple[int, int] = (0, 1),
        reuse: bool = False,
    ) -> Iterator[Any]:
        """Shuffled mini-batches ``[batch_size, d]`` of one site, in ``dtype`` on ``device``.

        Memory stays bounded by about ``buffer_rows`` rows plus one shard per site,
        whatever the store's size: each epoch visits the shards in a seeded
        random order, pools them in a buffer of ``buffer_rows`` rows, shuffles
        the pool, and hands out half of it before refilling. The same seed
        gives the same batches. The pool lives on ``device`` and shards are
        read ahead in a background thread (:mod:`circuitsae.data.reader`);
        ``reader="reference"`` runs the plain implementation it is tested
        against (same batches, slower). ``part=(rank, world_size)`` yields only
        that rank's contiguous share of every batch (data-parallel training).
        ``reuse=True`` lets the fast reader hand out the same buffers again two
        batches later (for a caller done with each batch by then, like the trainer).

        ``site`` may be a list of sites: each batch is then a tuple with one
        tensor per site, all for the same rows (one read serves SAEs at
        several sites). ``skip`` drops the first ``skip`` batches without
        copying them, so a resumed run sees exactly the batches it had left.
        Non-finite activations raise, naming the shard file and row.
        """
        if batch_size < 1 or epochs < 1:
            raise CircuitSAEError("batch_size and epochs must be >= 1")
        if not (len(part) == 2 and 0 <= part[0] < part[1]):
            raise CircuitSAEError(f"part must be (rank, world_size) with 0 <= rank < world_size, got {part!r}")
        if reader not in ("fast", "reference"):
            raise CircuitSAEError(f"unknown reader {reader!r}: use 'fast' or 'reference'")
        single = isinstance(site, str)
        names = [self._site(s) for s in ([site] if single else site)]
        manifests = self._split(split)
        if not manifests:
            raise CircuitSAEError(f"store {self.root} has no {split} shards")

        def load(i: int) -> list[torch.Tensor]:
            return [from_numpy(self._read(manifests[i], s, verify), self.dtype) for s in names]

        def where(i: int, k: int) -> str:
            return str(self.root / manifests[i]["files"][names[k]]["name"])

        make = shuffled_batches if reader == "fast" else reference_batches
        stream = make(
            load,
            [m["rows"] for m in manifests],
            where,
            batch_size,
            width=self.d,
            storage_dtype=STORE_DTYPES[self.dtype][1],
            n_sites=len(names),
            epochs=epochs,
            seed=seed,
            device=device,
            dtype=dtype,
            buffer_rows=buffer_rows,
            drop_last=drop_last,
            skip=skip,
            prefetch=prefetch,
            part=part,
            reuse=reuse,
        )
        return _unpack_single(stream) if single else _as_tuples(stream)

    def n_batches(self, batch_size: int, *, epochs: int = 1, split: str = "train", drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields with these settings."""
        n = self.n_rows(split)
        return epochs * (n // batch_size + int(bool(n % batch_size) and not drop_last))

    def activations(
        self, site: str, split: str = "heldout", max_rows: "int | None" = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """All activations ``[rows, d]`` of ``split`` in store order (default: the held-out slice)."""
        site, out, n = self._site(site), [], 0
        for m in self._split(split):
            if max_rows is not None and n >= max_rows:
                break
            out.append(from_numpy(self._read(m, site, verify=True), self.dtype).to(dtype))
            n += m["rows"]
        if not out:
            raise CircuitSAEError(f"store {self.root} has no {split} activations")
        x = torch.cat(out)
        return x if max_rows is None else x[:max_rows]

    def describe(self) -> str:
        """How the store is named in messages."""
        return f"store {self.root}"

    def samples(self, names: Sequence[str], split: str, max_rows: int) -> Iterator[list[torch.Tensor]]:
        """The first ``max_rows`` rows of ``split`` in store order, shard by shard: one tensor per site of ``names``
        in the storage dtype (the interface :class:`~circuitsae.data.stream.ModelStream` shares)."""
        names, have = [self._site(s) for s in names], 0
        for m in self._split(split):
            if have >= max_rows:
                return
            take = min(m["rows"], max_rows - have)
            yield [from_numpy(self._read(m, s, verify=True), self.dtype)[:take] for s in names]
            have += take

    def sample(self, names: Sequence[str], split: str, max_rows: int) -> dict[str, torch.Tensor]:
        """:meth:`samples` concatenated: ``{site: [rows, d]}`` in the storage dtype."""
        parts = list(self.samples(names, split, max_rows))
        if not parts:
            raise CircuitSAEError(f"store {self.root} has no {split} activations")
        return {s: torch.cat([p[k] for p in parts]) for k, s in enumerate(names)}

    def tokens(self, split: str = "train") -> torch.Tensor:
        """Token ids ``[contexts, ctx_len]`` (int64) of ``split``, in store order."""
        parts = [torch.from_numpy(self._read(m, "tokens", verify=True).astype(np.int64)) for m in self._split(split)]
        return (
            torch.cat(parts)
            if parts
            else torch.empty(0, self.meta["config"]["ctx_len"], dtype=torch.long, device="cpu")
        )

    def locate(self, row: int, split: str = "train") -> tuple[int, int]:
        """``(context, position)`` of activation row ``row``: ``tokens(split)[context, position]`` is its token."""
        per = int(self.meta["rows_per_context"])
        if not 0 <= row < self.n_rows(split):
            raise CircuitSAEError(f"row {row} is out of range for the {split} split ({self.n_rows(split)} rows)")
        return row // per, int(self.meta["first_position"]) + row % per


def _unpack_single(stream: Iterator[list[torch.Tensor]]) -> Iterator[torch.Tensor]:
    with contextlib.closing(stream):
        for parts in stream:
            yield parts[0]


def _as_tuples(stream: Iterator[list[torch.Tensor]]) -> Iterator[tuple[torch.Tensor, ...]]:
    with contextlib.closing(stream):
        for parts in stream:
            yield tuple(parts)


class SiteView:
    """The store seen through one site: ``store["resid.3"].batches(4096)``."""

    def __init__(self, store: ActivationStore, site: str) -> None:
        self.store, self.site = store, site

    @property
    def d(self) -> int:
        return self.store.d

    def n_rows(self, split: str = "train") -> int:
        return self.store.n_rows(split)

    def batches(self, batch_size: int, **kwargs: Any) -> Iterator[torch.Tensor]:
        return self.store.batches(self.site, batch_size, **kwargs)

    def heldout(self, max_rows: "int | None" = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.store.activations(self.site, "heldout", max_rows, dtype)

    def __repr__(self) -> str:
        return f"SiteView({self.site!r} of {self.store.root})"


def store_from_tensors(
    root: "str | Path",
    train: "dict[str, torch.Tensor]",
    heldout: "dict[str, torch.Tensor] | None" = None,
    *,
    model: str = "tensors",
    dtype: str = "float32",
    shard_rows: int = 1 << 14,
) -> ActivationStore:
    """Write activations you already have (``{site: [rows, d]}``) as a store, e.g. synthetic data.

    There are no real token ids: each row is its own one-token "context" with
    token id 0. Sites must all have the same rows and width.
    """
    splits = {"train": train, "heldout": heldout or {s: x[:0] for s, x in train.items()}}
    shapes = {tuple(x.shape) for x in train.values()}
    widths = {x.shape[-1] for part in splits.values() for x in part.values()}
    if len(shapes) != 1 or len(widths) != 1 or set(splits["heldout"]) != set(train):
        raise CircuitSAEError("every site needs activations of one shape [rows, d], in both splits")
    meta = {
        "config": {"model": model, "corpus": None, "ctx_len": 1, "source": "tensors"},
        "sites": list(train),
        "d": widths.pop(),
        "dtype": dtype,
        "rows_per_context": 1,
        "first_position": 0,
        "start_token_id": None,
        "splits": {
            s: {"contexts": n, "shards": math.ceil(n / shard_rows), "rows": n}
            for s, n in ((s, next(iter(part.values())).shape[0]) for s, part in splits.items())
        },
    }
    writer = StoreWriter(root, meta)
    for split, part in splits.items():
        n = meta["splits"][split]["rows"]
        for i, r0 in enumerate(range(0, n, shard_rows)):
            r1 = min(n, r0 + shard_rows)
            writer.write_shard(
                split,
                i,
                r0,
                torch.zeros(r1 - r0, 1, dtype=torch.int32, device="cpu"),
                {s: x[r0:r1] for s, x in part.items()},
            )
    writer.finish()
    return ActivationStore(root)


def recorded_store(
    meta: "dict[str, Any]", folder: "str | Path | None" = None, where: str = "the dictionary"
) -> ActivationStore:
    """The store a saved dictionary records in its ``meta``: ``store`` (a path relative to the dictionary's own
    ``folder``, or for older dictionaries relative to where training ran) and ``store_fingerprint``.

    The path is tried relative to ``folder`` first, then as written (from the working directory); a store found
    there whose fingerprint differs from the recorded one is not the store the dictionary was trained on, and
    is refused in one line.
    """
    recorded = meta.get("store")
    if not recorded:
        raise CircuitSAEError(f"{where} does not name its activation store: pass --store")
    if not isinstance(recorded, str) or "\0" in recorded:
        raise CircuitSAEError(f"{where} records its activation store as {recorded!r}, not a path: pass --store")
    candidates = [Path(folder) / recorded] if folder is not None and not Path(recorded).is_absolute() else []
    candidates.append(Path(recorded))
    found = next((p for p in candidates if (p / "meta.json").is_file()), None)
    if found is None:
        tried = " or ".join(str(p) for p in dict.fromkeys(candidates))
        raise CircuitSAEError(f"{where} was trained on store {recorded}, which is not at {tried}: pass --store")
    store = ActivationStore(found)
    expected = meta.get("store_fingerprint")
    if expected and store.fingerprint != expected:
        raise CircuitSAEError(
            f"store {found} is not the one {where} was trained on (fingerprint {store.fingerprint}, recorded "
            f"{expected}): pass the right one with --store"
        )
    return store
