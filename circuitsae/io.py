"""File utilities every wing shares: atomic writes, content digests and sha256 of files.

``atomic_write`` writes to a temporary name unique to this host, rank and process, flushes it to disk and
renames it into place, so readers see no file or the whole file. ``sha256_file`` hashes from a memory map;
``digest`` fingerprints the bytes of files and folders.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np


def sha256_file(path: "str | Path") -> str:
    """sha256 hex digest of a file, hashed from a memory map (the GIL is released while hashing)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                h.update(m)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b: Any) -> int:
        self.sha.update(b)
        self.n += len(memoryview(b).cast("B"))
        return self.f.write(b)


def writer_tag() -> str:
    """What makes this writer's temporary names its own: host, rank (torchrun's RANK) and process."""
    host = socket.gethostname().replace("-", "_").replace("/", "_") or "host"
    return f"{host}-r{os.environ.get('RANK', '0')}"


def atomic_write(path: Path, data: "bytes | np.ndarray") -> tuple[int, str]:
    """Write bytes, or an array as ``.npy``, so that readers see no file or the whole file.

    The data goes to a temporary name (unique to this host, rank and process, so
    concurrent writers never touch each other's), is flushed to disk and renamed into
    place. Arrays are streamed in chunks (no whole-file copy in memory).
    Returns ``(bytes written, sha256 hex digest)``.
    """
    tmp = path.with_name(f".tmp-{writer_tag()}-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as f:
        w = _HashingWriter(f)
        if isinstance(data, np.ndarray):
            np.lib.format.write_array(w, np.ascontiguousarray(data), allow_pickle=False)
        else:
            w.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return w.n, w.sha.hexdigest()


def digest(paths: "list[Path] | list[str]") -> str:
    """sha1 over the bytes of every file in ``paths`` (folders: their files, sorted): a content fingerprint."""
    h = hashlib.sha1()
    for p in map(Path, paths):
        for f in sorted(p.glob("*")) if p.is_dir() else [p]:
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


__all__ = ["atomic_write", "digest", "sha256_file", "writer_tag"]
