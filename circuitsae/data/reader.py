"""Reading shards for training: seeded shuffled batches, fast enough to keep a GPU busy.

:meth:`ActivationStore.batches <circuitsae.data.store.ActivationStore.batches>` hands this module
a way to load shard ``i`` (``load(i)``: one host tensor per site, in the storage dtype) and the
shards' row counts; :func:`shuffled_batches` turns them into batches on the training device.

**What a seed decides.** Each epoch visits the shards in a seeded random order and pools them
until the pool holds ``buffer_rows`` rows; the pool is permuted and its first half (in whole
batches) handed out; the rest stays for the next round, and what is left at the end of the
epoch is handed out last. :func:`reference_batches` is that procedure written plainly
(concatenate, permute, slice, convert); :func:`shuffled_batches`
yields exactly the same batches, bit for bit (tested), while moving each activation far less:

* **The pool is a buffer of slots on the device**, in the storage dtype (fp16/bf16/fp32). A
  shard's rows are copied into free slots once — on a GPU from pinned host memory with
  ``non_blocking`` copies — and each row leaves once, gathered straight into its batch and
  converted to the requested dtype on the device. The permutations act on slot numbers (a small
  CPU index), so no row is moved when the pool is re-shuffled.
* **Finiteness is checked on the device** as a shard enters the pool, with one min/max
  reduction (the harvest already refuses non-finite values; this catches a store written
  otherwise). The error names the file and row.
* **A read-ahead thread** runs the seeded schedule and loads the next shards — checksums
  (verified once per process, see :mod:`circuitsae.data.store`), memory maps, the copy into pinned
  memory — while the caller trains on the current batch. At most ``prefetch`` shards wait.

Memory stays bounded: the pool holds at most ``buffer_rows`` plus one shard's rows per site
(more only when a batch is larger than half the pool, exactly as the reference then holds
more), plus the shards read ahead.

What runs where on a GPU: the read-ahead thread does host work only (hashing, page faults,
the copy into pinned memory); the device work (host-to-device copies, the finiteness
reduction, scatter into slots, gathers, dtype conversion) is queued from the caller's thread
on its current stream, asynchronously except for the one finiteness check per shard. Tests
run this on the CPU and on the fake CUDA device of ``tests/fake_cuda.py``; the pinned-memory path has not
run on a real GPU.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from circuitsae.errors import CircuitSAEError

Load = Callable[[int], "list[torch.Tensor]"]
Where = Callable[[int, int], str]


def _non_finite(where: str, row: int) -> CircuitSAEError:
    return CircuitSAEError(
        f"non-finite activation (NaN or inf) in {where} at row {row}: "
        f"re-harvest that shard (a float16 overflow? harvest with --dtype bfloat16)"
    )


def _first_bad_row(x: torch.Tensor) -> int:
    return int((~torch.isfinite(x)).any(dim=1).nonzero()[0, 0])


def _share(start: int, end: int, part: tuple[int, int]) -> slice:
    """Rows ``start .. end`` of a batch that rank ``part[0]`` of ``part[1]`` takes: a contiguous share."""
    rank, size = part
    n = end - start
    return slice(start + n * rank // size, start + n * (rank + 1) // size)


def _schedule(
    rows: Sequence[int], batch_size: int, epochs: int, seed: int, buffer_rows: int, drop_last: bool, skip: int
) -> Iterator[tuple]:
    """The seeded decisions of the reader, without data.

    Yields ``("add", i)`` (shard ``i`` joins the pool) and ``("mix", perm, starts, stop, last)``:
    permute the pool by ``perm``, hand out the batches starting at ``starts`` (those not
    skipped) of the first ``stop`` rows, keep the rest (or, if ``last``, empty the pool).
    """
    gen = torch.Generator().manual_seed(seed)
    counter = 0

    def starts(stop: int) -> list[int]:
        nonlocal counter
        out = []
        for j in range(0, stop, batch_size):
            counter += 1
            if counter > skip:
                out.append(j)
        return out

    for _ in range(epochs):
        pooled = 0
        for i in torch.randperm(len(rows), generator=gen, device="cpu").tolist():
            yield ("add", i)
            pooled += rows[i]
            if pooled >= buffer_rows:
                perm = torch.randperm(pooled, generator=gen, device="cpu")
                n_out = (pooled // 2) // batch_size * batch_size
                yield ("mix", perm, starts(n_out), n_out, False)
                pooled -= n_out
        if pooled:
            perm = torch.randperm(pooled, generator=gen, device="cpu")
            stop = pooled - (pooled % batch_size if drop_last else 0)
            yield ("mix", perm, starts(stop), stop, True)


def _touch(x: torch.Tensor) -> None:
    """Fault in every page of a (memory-mapped) tensor here, in the read-ahead thread, not in the caller's."""
    flat = x.reshape(-1)
    if flat.numel():
        flat[:: max(1, 4096 // x.element_size())].sum()


class _ReadAhead:
    """Runs the schedule in a daemon thread, loading each added shard; the caller iterates the events."""

    _END = object()

    def __init__(self, events: Iterator[tuple], load: Load, pin: bool, prefetch: int) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(events, load, pin), name="circuitsae-read-ahead", daemon=True
        )
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, events: Iterator[tuple], load: Load, pin: bool) -> None:
        try:
            for ev in events:
                if ev[0] == "add":
                    parts = load(ev[1])
                    if pin:  # page-locked copies: the host-to-device copy can then be asynchronous
                        parts = [torch.empty_like(p, pin_memory=True).copy_(p) for p in parts]
                    else:
                        for p in parts:
                            _touch(p)
                    ev = ("add", ev[1], parts)
                if not self._put(ev):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the caller, raised there
            self._put(("error", e))

    def __iter__(self) -> Iterator[tuple]:
        while True:
            item = self.q.get()
            if item is self._END:
                return
            if item[0] == "error":
                raise item[1]
            yield item

    def close(self) -> None:
        self.stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=10)


class _Inline:
    """The schedule run in the caller's thread, each added shard loaded there (``prefetch=0``): for a ``load`` that
    is itself heavy work on the caller's device, such as a forward pass of the model."""

    def __init__(self, events: Iterator[tuple], load: Load) -> None:
        self.events, self.load = events, load

    def __iter__(self) -> Iterator[tuple]:
        for ev in self.events:
            yield ("add", ev[1], self.load(ev[1])) if ev[0] == "add" else ev

    def close(self) -> None:
        pass


def needed_shards(
    rows: Sequence[int],
    batch_size: int,
    *,
    epochs: int = 1,
    seed: int = 0,
    buffer_rows: int = 1 << 18,
    drop_last: bool = False,
    skip: int = 0,
) -> list[bool]:
    """For each shard the schedule adds, in order: whether any of its rows is handed out in a batch past the first
    ``skip``. A resumed reader need not load the others (their rows only fill the pool's places), which saves a
    resumed training from a model the forward passes of the data it has already trained on."""
    events = _schedule(rows, batch_size, epochs, seed, buffer_rows, drop_last, skip)
    pool = torch.empty(0, dtype=torch.long)  # which add event each pooled row came from
    needed: list[bool] = []
    for ev in events:
        if ev[0] == "add":
            pool = torch.cat([pool, torch.full((rows[ev[1]],), len(needed), dtype=torch.long)])
            needed.append(False)
            continue
        _, perm, starts, stop, last = ev
        mixed = pool[perm]
        for j in starts:
            for a in torch.unique(mixed[j : min(j + batch_size, stop)]).tolist():
                needed[a] = True
        pool = pool.new_empty(0) if last else mixed[stop:]
    return needed


class _Pool:
    """What both pools share: the slots' logical order, and handing out a permuted round of it."""

    order: torch.Tensor

    def reset(self) -> None:
        raise NotImplementedError

    def _gather(self, slots: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        raise NotImplementedError

    def _keep(self, mixed: torch.Tensor, stop: int) -> None:
        """After a round: the rows past ``stop`` stay, in their new order; the rest are gone."""
        raise NotImplementedError

    def mix(
        self,
        perm: torch.Tensor,
        starts: list[int],
        stop: int,
        last: bool,
        batch_size: int,
        dtype: torch.dtype,
        part: tuple[int, int],
    ) -> Iterator[list[torch.Tensor]]:
        mixed = self.order[perm]
        for j in starts:
            yield self._gather(mixed[_share(j, min(j + batch_size, stop), part)], dtype)
        if last:
            self.reset()
        else:
            self._keep(mixed, stop)

    def close(self) -> None:
        pass


class _SlotPool(_Pool):
    """The shuffle pool: one buffer of slots per site on the device, and the slots' logical order."""

    def __init__(self, n_sites: int, width: int, dtype: torch.dtype, device: torch.device, capacity: int) -> None:
        self.device, self.dtype, self.width = device, dtype, width
        self.bufs = [torch.empty(capacity, width, dtype=dtype, device=device) for _ in range(n_sites)]
        self.reset()

    @property
    def capacity(self) -> int:
        return self.bufs[0].shape[0]

    def reset(self) -> None:
        self.order = torch.empty(0, dtype=torch.long, device="cpu")  # slots, in the pool's logical order
        self.free = torch.arange(self.capacity, device="cpu")

    def _grow(self, need: int) -> None:
        old = self.capacity
        new = max(need, 2 * old)
        grown = []
        for buf in self.bufs:
            b = torch.empty(new, self.width, dtype=self.dtype, device=self.device)
            b[:old].copy_(buf)
            grown.append(b)
        self.bufs = grown
        self.free = torch.cat([self.free, torch.arange(old, new, device="cpu")])

    def add(self, parts: list[torch.Tensor], where: Callable[[int], str]) -> None:
        n = int(parts[0].shape[0])
        if n == 0:
            return
        if n > self.free.numel():
            self._grow(self.capacity - self.free.numel() + n)
        slots, self.free = self.free[:n], self.free[n:]
        index = slots.to(self.device, non_blocking=True)
        for k, (buf, host) in enumerate(zip(self.bufs, parts)):
            x = host.to(self.device, non_blocking=True)
            lo, hi = torch.aminmax(x)
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                raise _non_finite(where(k), _first_bad_row(x))
            buf.index_copy_(0, index, x)
        self.order = torch.cat([self.order, slots])

    def _gather(self, slots: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        index = slots.to(self.device, non_blocking=True)
        return [buf.index_select(0, index).to(dtype) for buf in self.bufs]

    def _keep(self, mixed: torch.Tensor, stop: int) -> None:
        self.free = torch.cat([self.free, mixed[:stop]])
        self.order = mixed[stop:]


class _MappedPool(_Pool):
    """The shuffle pool on the CPU: rows stay in the memory-mapped shards (page-cache memory); a batch is
    gathered straight from them, so each row is copied once, into its batch.

    A slot number is ``shard * stride + row``; a shard's mapping is dropped once none of its rows is left.
    """

    def __init__(self, n_sites: int, stride: int, reuse: bool = False) -> None:
        self.n_sites, self.stride, self.reuse = n_sites, max(1, stride), reuse
        self.scratch: dict[str, torch.Tensor] = {}
        self.handed = 0  # batches handed out (picks the ring buffer when reusing)
        self.workers: "concurrent.futures.ThreadPoolExecutor | None" = None
        self.reset()

    def reset(self) -> None:
        self.shards: dict[int, tuple[list[torch.Tensor], Callable[[int], str]]] = {}
        self.next_id = 0
        self.order = torch.empty(0, dtype=torch.long, device="cpu")

    def add(self, parts: list[torch.Tensor], where: Callable[[int], str]) -> None:
        n = int(parts[0].shape[0])
        if n == 0:
            return
        sid, self.next_id = self.next_id, self.next_id + 1
        self.shards[sid] = (parts, where)
        self.order = torch.cat([self.order, sid * self.stride + torch.arange(n, device="cpu")])

    def _buffer(self, name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        """A scratch buffer kept between batches (fresh large allocations cost page faults on every batch)."""
        buf = self.scratch.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1:] != like.shape[1:] or buf.dtype != like.dtype:
            buf = self.scratch[name] = torch.empty(rows, *like.shape[1:], dtype=like.dtype, device="cpu")
        return buf[:rows]

    def _gather(self, slots: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        n = slots.numel()
        ids = torch.div(slots, self.stride, rounding_mode="floor")
        ids_sorted, by_shard = torch.sort(ids, stable=True)
        rows = (slots - ids * self.stride)[by_shard]
        back = torch.empty_like(by_shard).index_copy_(0, by_shard, torch.arange(n, device="cpu"))
        groups = list(zip(*(t.tolist() for t in torch.unique_consecutive(ids_sorted, return_counts=True))))
        self.handed += 1

        def site(k: int) -> torch.Tensor:
            first = self.shards[groups[0][0]][0][k]
            grouped = self._buffer(f"grouped{k}", n, first)  # rows in shard order
            a = 0
            for sid, count in groups:
                torch.index_select(self.shards[sid][0][k], 0, rows[a : a + count], out=grouped[a : a + count])
                a += count
            lo, hi = torch.aminmax(grouped)
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                j = _first_bad_row(grouped)
                raise _non_finite(self.shards[int(ids_sorted[j])][1](k), int(rows[j]))
            if self.reuse:  # a ring of two batches per site: no fresh pages to fault in per batch
                ring = self._buffer(f"out{k}-{self.handed % 2}", n, torch.empty(0, first.shape[1], dtype=dtype))
                if dtype == grouped.dtype:
                    return torch.index_select(grouped, 0, back, out=ring)
                return ring.copy_(torch.index_select(grouped, 0, back, out=self._buffer(f"ordered{k}", n, grouped)))
            if dtype == grouped.dtype:
                return grouped.index_select(0, back)
            return torch.index_select(grouped, 0, back, out=self._buffer(f"ordered{k}", n, grouped)).to(dtype)

        if self.n_sites == 1:
            return [site(0)]
        if self.workers is None:  # sites in parallel threads: torch releases the GIL in every copy
            self.workers = concurrent.futures.ThreadPoolExecutor(min(self.n_sites, os.cpu_count() or 1))
        return list(self.workers.map(site, range(self.n_sites)))

    def close(self) -> None:
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None

    def _keep(self, mixed: torch.Tensor, stop: int) -> None:
        self.order = mixed[stop:]
        live = set(torch.unique(torch.div(self.order, self.stride, rounding_mode="floor")).tolist())
        for sid in [s for s in self.shards if s not in live]:
            del self.shards[sid]


def shuffled_batches(
    load: Load,
    rows: Sequence[int],
    where: Where,
    batch_size: int,
    *,
    width: int,
    storage_dtype: torch.dtype,
    n_sites: int,
    epochs: int = 1,
    seed: int = 0,
    device: "str | torch.device" = "cpu",
    dtype: torch.dtype = torch.float32,
    buffer_rows: int = 1 << 18,
    drop_last: bool = False,
    skip: int = 0,
    prefetch: int = 4,
    pool: str = "auto",
    part: tuple[int, int] = (0, 1),
    reuse: bool = False,
) -> Iterator[list[torch.Tensor]]:
    """Seeded shuffled batches (one tensor per site) of shards ``load(0) .. load(len(rows) - 1)``.

    ``load(i)`` returns shard ``i`` as one host tensor ``[rows[i], width]`` per site in
    ``storage_dtype`` (a memory map is fine); it is called in the read-ahead thread.
    ``where(i, k)`` names the file of shard ``i``, site ``k`` for error messages. The batches equal
    :func:`reference_batches`' with the same arguments (see the module docstring).
    ``part=(rank, world_size)`` yields only that rank's contiguous share of every batch (data-parallel
    training: the shares of all ranks, in rank order, are the whole batch).
    ``reuse=True`` may hand out the same buffers again two batches later (on the CPU, where fresh
    batch-sized tensors cost page faults): for a caller that is done with a batch when it asks for
    the one after next, as the trainer is.
    ``pool``: ``"mapped"`` (rows stay in the memory maps; the CPU's default), ``"slots"`` (a buffer on
    ``device``; every other device's default) or ``"auto"``. ``prefetch=0`` loads each shard in the caller's
    thread, when the schedule reaches it.
    """
    device = torch.device(device)
    if pool not in ("auto", "mapped", "slots"):
        raise CircuitSAEError(f"unknown pool {pool!r}: use auto, mapped or slots")
    if pool == "mapped" and device.type != "cpu":
        raise CircuitSAEError("pool='mapped' keeps rows in host memory maps: it serves the CPU only")
    mapped = pool == "mapped" or (pool == "auto" and device.type == "cpu")
    events = _schedule(rows, batch_size, epochs, seed, buffer_rows, drop_last, skip)
    widest = max(rows, default=0)

    def stream() -> Iterator[list[torch.Tensor]]:
        # pinned memory needs a CUDA driver; the fake CUDA device of the tests has none (and needs none)
        pin = device.type == "cuda" and torch.backends.cuda.is_built() and torch.cuda.is_available()
        slots: _Pool = (
            _MappedPool(n_sites, widest, reuse)
            if mapped
            else _SlotPool(n_sites, width, storage_dtype, device, buffer_rows + widest)
        )
        ahead: "_ReadAhead | _Inline" = (
            _ReadAhead(events, load, pin, prefetch) if prefetch > 0 else _Inline(events, load)
        )  # a thread starts with the first batch asked for
        try:
            for ev in ahead:
                if ev[0] == "add":
                    i = ev[1]
                    slots.add(ev[2], lambda k, i=i: where(i, k))
                else:
                    yield from slots.mix(*ev[1:], batch_size, dtype, part)
        finally:
            ahead.close()
            slots.close()

    return stream()


def reference_batches(
    load: Load,
    rows: Sequence[int],
    where: Where,
    batch_size: int,
    *,
    epochs: int = 1,
    seed: int = 0,
    device: "str | torch.device" = "cpu",
    dtype: torch.dtype = torch.float32,
    buffer_rows: int = 1 << 18,
    drop_last: bool = False,
    skip: int = 0,
    part: tuple[int, int] = (0, 1),
    **_: Any,
) -> Iterator[list[torch.Tensor]]:
    """The reader as it was written first: the definition :func:`shuffled_batches` is tested against.

    Takes :func:`shuffled_batches`' arguments; those about how it reads (``width``, ``pool``, ``reuse``,
    ``prefetch``, ...) do not apply and are ignored.

    Every shard is loaded and checked on the CPU in the caller's thread, the pool concatenated
    and permuted as rows, and each batch converted and copied to the device as it is handed out.
    """
    gen = torch.Generator().manual_seed(seed)
    counter = 0

    def finite(i: int) -> list[torch.Tensor]:
        parts = load(i)
        for k, x in enumerate(parts):
            if not bool(torch.isfinite(x).all()):
                raise _non_finite(where(i, k), _first_bad_row(x))
        return parts

    def emit(parts: list[torch.Tensor], j: int) -> list[torch.Tensor]:
        share = _share(j, min(j + batch_size, parts[0].shape[0]), part)
        return [p[share].to(device=device, dtype=dtype, non_blocking=True) for p in parts]

    for _ in range(epochs):
        pool: list[list[torch.Tensor]] = []
        pooled = 0
        for i in torch.randperm(len(rows), generator=gen, device="cpu").tolist():
            pool.append(finite(i))
            pooled += pool[-1][0].shape[0]
            if pooled >= buffer_rows:
                perm = torch.randperm(pooled, generator=gen, device="cpu")
                n_sites = len(pool[0])
                mixed = [torch.cat([p[k] for p in pool])[perm] for k in range(n_sites)]
                n_out = (pooled // 2) // batch_size * batch_size
                for j in range(0, n_out, batch_size):
                    counter += 1
                    if counter > skip:
                        yield emit(mixed, j)
                pool, pooled = [[m[n_out:] for m in mixed]], pooled - n_out
        if pooled:
            perm = torch.randperm(pooled, generator=gen, device="cpu")
            rest = [torch.cat([p[k] for p in pool])[perm] for k in range(len(pool[0]))]
            stop = pooled - (pooled % batch_size if drop_last else 0)
            for j in range(0, stop, batch_size):
                counter += 1
                if counter > skip:
                    yield emit(rest, j)
