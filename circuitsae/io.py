"""File utilities every wing shares: atomic writes, folder locks, output probes, digests and sha256 of files.

``atomic_write`` writes to a temporary name unique to this host, rank and process, flushes it to disk and
renames it into place, so readers see no file or the whole file; a write that fails leaves no temporary file,
and a full disk is one line naming the file and the free space (:func:`disk_full`). ``append_bytes`` appends
whole or not at all. ``lock_folder`` makes a process the one writer of a folder (``fcntl.flock``, released when
the process dies); ``probe_folder`` checks that a folder can be written before any long work.
``sha256_file`` hashes from a memory map; ``digest`` fingerprints the bytes of files and folders.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from circuitsae.errors import CircuitSAEError

#: the lock file every writer of a folder holds (:func:`lock_folder`); not part of what the folder holds
LOCK_NAME = ".circuitsae.lock"
#: errno values of a full disk and of an exceeded quota
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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
    try:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            if isinstance(data, np.ndarray):
                np.lib.format.write_array(w, np.ascontiguousarray(data), allow_pickle=False)
            else:
                w.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # any failure, Ctrl-C included: no temporary file is left behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        full = disk_full(e, path)
        if full is not None:
            raise full from None
        raise
    _fsync_dir(path.parent)
    return w.n, w.sha.hexdigest()


def append_bytes(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` whole or not at all: a failed append is cut back to the previous end."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            full = disk_full(e, path)
            if full is not None:
                raise full from None
            raise
    finally:
        os.close(fd)


def human_bytes(n: float) -> str:
    """``n`` bytes as a short human-readable size: ``512 B``, ``1.5 MB``, ``2.0 GB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def free_space(path: "str | Path") -> str:
    """The free space on the file system holding ``path`` (or its nearest existing ancestor), human-readable."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return human_bytes(shutil.disk_usage(p).free)
    except OSError:
        return "unknown space"


def disk_full(e: BaseException, path: "str | Path | None" = None) -> "CircuitSAEError | None":
    """The one-line error for ``e`` if it is a full disk (ENOSPC) or an exceeded quota (EDQUOT), else None.

    ``path``: what was being written (default: the file named by ``e``, if any).
    """
    if not isinstance(e, OSError) or e.errno not in DISK_FULL:
        return None
    target = path if path is not None else e.filename
    what = f" while writing {target}" if target else ""
    free = free_space(target if target else ".")
    reason = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
    return CircuitSAEError(f"{reason}{what} ({free} free there): free some space, then re-run the same command")


def probe_folder(folder: "str | Path") -> Path:
    """Create ``folder`` if needed and check that a file can be written in it; one-line error otherwise.

    Run before any long work, so an output that cannot be written is refused at the start, not at the end.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CircuitSAEError(f"output folder {str(folder)!r} is a file: choose another output folder")
    probe = folder / f".tmp-{writer_tag()}-{os.getpid()}-probe"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"circuitsae: can this folder be written?\n")
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        full = disk_full(e, folder)
        raise full or CircuitSAEError(f"cannot write to output folder {str(folder)!r}: {e.strerror or e}") from None
    return folder


def probe_file(path: "str | Path") -> Path:
    """Check, before any long work, that the file ``path`` can be written (its folder is probed and created)."""
    path = Path(path)
    if path.is_dir():
        raise CircuitSAEError(f"output file {str(path)!r} is a folder: name a file")
    probe_folder(path.parent)
    return path


def digest(paths: "list[Path] | list[str]") -> str:
    """sha1 over the bytes of every file in ``paths`` (folders: their files, sorted): a content fingerprint."""
    h = hashlib.sha1()
    for p in map(Path, paths):
        for f in sorted(p.glob("*")) if p.is_dir() else [p]:
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


class _Held:
    """An open, flock-ed lock file of a folder, shared by every :class:`FolderLock` of that folder in this process."""

    def __init__(self, key: tuple[int, int], path: Path, fd: "int | None") -> None:
        self.key, self.path, self.fd, self.users = key, path, fd, 0
        self.created = False  # the folder did not exist: removed again at release if nothing was written in it


# The folders this process holds. A lock belongs to the process (flock locks an open file, and a second open of the
# same file in one process would conflict with the first), so a nested lock of a folder already held here (the
# demo holds its folder and trains and evaluates inside it) shares the held one instead of refusing.
_HELD: dict[tuple[int, int], _Held] = {}
_HELD_GUARD = threading.Lock()


def _command_line() -> str:
    """This process's command line, short: ``circuitsae harvest --out runs/acts`` for ``python -m circuitsae``."""
    argv = list(sys.argv) or ["python"]
    first = Path(argv[0])
    argv[0] = first.parent.name if first.name == "__main__.py" else first.name or "python"
    line = " ".join(argv)
    return line if len(line) <= 100 else line[:99] + "…"


def _holder(fd: int) -> dict[str, Any]:
    """What the process holding a lock file wrote into it (empty if it has not yet, or it is not readable)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _busy(folder: Path, what: str, info: dict[str, Any]) -> CircuitSAEError:
    who = f"process {info['pid']}" if "pid" in info else "another process"
    if info.get("host") and info["host"] != socket.gethostname():
        who += f" on {info['host']}"
    command = str(info.get("command", ""))
    if command and not command.startswith("circuitsae"):
        command = f"{info.get('what', what)}: {command}"
    since = ""
    with contextlib.suppress(KeyError, TypeError, ValueError):
        started = datetime.datetime.fromisoformat(info["started"])
        today = started.date() == datetime.date.today()
        since = f" since {started:%H:%M}" if today else f" since {started:%Y-%m-%d %H:%M}"
    return CircuitSAEError(
        f"{folder} is being written by {who}{f' ({command})' if command else ''}{since}: wait for it to finish "
        "or choose another output folder"
    )


def _take(folder: Path, key: tuple[int, int], what: str) -> _Held:
    """Open and flock ``folder``'s lock file, checking that the file locked is still the one at its path."""
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the folder's last holder removed it, empty, as we came: make it again
            folder.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as e:
            raise disk_full(e, path) or CircuitSAEError(
                f"cannot write to output folder {str(folder)!r}: {e.strerror or e}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(fd)
            os.close(fd)
            raise _busy(folder, what, info) from None
        except OSError as e:  # a file system without locks (ENOLCK, EOPNOTSUPP): write on, and say so
            os.close(fd)
            print(
                f"circuitsae: note: cannot lock {folder} ({e.strerror or e}): make sure no other process writes it",
                file=sys.stderr,
            )
            return _Held(key, path, None)
        # a releasing holder unlinks the file while it holds it: if ours is no longer the one at the path, retry
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": _command_line(),
        "what": what,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    with contextlib.suppress(OSError):  # the lock holds without it (a full disk may refuse these few bytes)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    return _Held(key, path, fd)


def _drop(held: _Held) -> None:
    """Remove the lock file (if it is still ours) while holding it, then close it: the lock is released."""
    if held.fd is None:
        return
    with contextlib.suppress(OSError):
        if os.path.samestat(os.fstat(held.fd), os.stat(held.path)):
            os.unlink(held.path)
    os.close(held.fd)
    if held.created:
        with contextlib.suppress(OSError):  # fails, as it should, unless the folder is empty
            held.path.parent.rmdir()


class FolderLock:
    """This process as the one writer of ``folder``: ``with lock_folder("runs/acts", "harvest"): ...``.

    Acquiring creates the folder and takes an exclusive ``fcntl.flock`` on its lock file (:data:`LOCK_NAME`),
    in which it writes this process's id, host, command line and start time. Another process holding it is
    refused in one line naming that process; the operating system releases the lock when its holder dies, so a
    killed writer (kill -9 included) never blocks the re-run. Within one process the lock is re-entrant: a
    nested lock of a folder already held here shares it. Released (and its file removed) by :meth:`release`,
    at the end of the ``with`` block, or when the object is garbage collected; a folder the lock created is
    removed again if nothing was written in it (a command that fails at its start leaves no empty folder).
    """

    def __init__(self, folder: "str | Path", what: str) -> None:
        self.folder = Path(folder)
        self.what = what
        self._held: "_Held | None" = None

    @property
    def held(self) -> bool:
        """Whether this object holds the folder (it may share the hold with a nested lock of this process)."""
        return self._held is not None

    def acquire(self) -> "FolderLock":
        """Take the folder (a no-op if this object holds it); one-line error if another process holds it."""
        if self._held is not None:
            return self
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise CircuitSAEError(f"output folder {str(folder)!r} is a file: choose another output folder")
        created = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            st = folder.stat()
        except OSError as e:
            raise disk_full(e, folder) or CircuitSAEError(
                f"cannot write to output folder {str(folder)!r}: {e.strerror or e}"
            ) from None
        key = (st.st_dev, st.st_ino)
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is None:
                held = _HELD[key] = _take(folder, key, self.what)
                held.created = created
            held.users += 1
        self._held = held
        return self

    def release(self) -> None:
        """Let go of the folder; the last holder in this process removes the lock file and releases the lock."""
        held, self._held = self._held, None
        if held is None:
            return
        with _HELD_GUARD:
            held.users -= 1
            if held.users > 0:
                return
            _HELD.pop(held.key, None)
        _drop(held)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def lock_folder(folder: "str | Path", what: str) -> FolderLock:
    """A :class:`FolderLock` of ``folder``, for ``with``; ``what`` names the writer (``"harvest"``, ``"training"``)."""
    return FolderLock(folder, what)


__all__ = [
    "DISK_FULL",
    "LOCK_NAME",
    "FolderLock",
    "append_bytes",
    "atomic_write",
    "digest",
    "disk_full",
    "free_space",
    "human_bytes",
    "lock_folder",
    "probe_file",
    "probe_folder",
    "sha256_file",
    "writer_tag",
]
