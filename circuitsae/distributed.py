"""Several processes, one job: ``torch.distributed``, as ``torchrun`` starts it.

``torchrun --nproc_per_node N -m circuitsae train ...`` (add ``--nnodes M --rdzv-endpoint HOST:PORT`` across
machines) starts N processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
set; :func:`init` joins them into one process group — ``nccl`` on GPUs, ``gloo`` on CPUs — with a timeout
(``CIRCUITSAE_DIST_TIMEOUT`` seconds, default 300), so a rank that dies or never arrives makes the others stop
with a clear message instead of waiting forever. Without those variables everything here is a no-op for a world
of one process, and ``train.py`` and ``harvest.py`` read as single-process code.

Collectives used: one all-reduce per training step (every run's gradients, dead-feature flags and losses in one
flat buffer, :func:`all_reduce_sum_`), an all-gather of the batch and a broadcast of the chosen rows at each
resampling, barriers around the store's ``meta.json`` and completion mark.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from circuitsae.errors import CircuitSAEError

DEFAULT_TIMEOUT_S = 300.0
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` (``local_rank`` on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that writes checkpoints, logs, saved dictionaries and the store's marks."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = World()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise CircuitSAEError(f"environment variable {name}={value!r} is not an integer") from None


def timeout_s() -> float:
    value = os.environ.get("CIRCUITSAE_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        return float(value)
    except ValueError:
        raise CircuitSAEError(f"CIRCUITSAE_DIST_TIMEOUT={value!r} is not a number of seconds") from None


def current() -> World:
    """The world of an initialised process group, else what the environment says, else one process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


@contextlib.contextmanager
def _native_stderr_held() -> Iterator[Any]:
    """Hold what C++ code writes to file descriptor 2 (c10d logs a stack trace for every refused connection):
    a failed rendezvous is then one line of ours, not forty of its."""
    sys.stderr.flush()
    saved = os.dup(2)
    held = tempfile.TemporaryFile(mode="w+")
    os.dup2(held.fileno(), 2)
    try:
        yield held
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        held.seek(0)


def init(device_type: str = "cpu") -> World:
    """Join the job ``torchrun`` started (a no-op for one process); returns this process's :class:`World`."""
    env = current()
    if env.size <= 1:
        return SINGLE
    if dist.is_initialized():
        return current()
    if not dist.is_available():
        raise CircuitSAEError("this PyTorch build has no torch.distributed: run one process")
    backend = "nccl" if device_type == "cuda" else "gloo"
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    # torch._dynamo, imported for the first time while a process group exists (torch.optim imports it when
    # the first optimiser is made), keeps a reference to that group: destroy_process_group then leaves the
    # gloo threads running into interpreter shutdown, where they can abort the process (SIGABRT) as the
    # other ranks close their connections. Imported before the group, it holds none.
    import torch._dynamo  # noqa: F401

    try:
        with _native_stderr_held() as held:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
        sys.stderr.write(held.read())  # joined: what the native code said is not an error, pass it on
        held.close()
    except Exception as e:  # noqa: BLE001 — every failure to join is the same message to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CircuitSAEError(
            f"rank {env.rank} of {env.size} on {socket.gethostname()} could not join the rendezvous at {where} "
            f"({backend}): {first}"
        ) from None
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    return current()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _lost(what: str, e: Exception) -> CircuitSAEError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CircuitSAEError(
        f"rank {dist.get_rank()} lost the other ranks during {what} ({first}): a rank died or hung; "
        "the last checkpoint is kept: re-run the same command to resume"
    )


def all_reduce_sum_(buf: torch.Tensor, what: str = "a step") -> torch.Tensor:
    """Sum ``buf`` over all ranks, in place."""
    try:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    except Exception as e:  # noqa: BLE001
        raise _lost(what, e) from None
    return buf


def all_gather_cat(x: torch.Tensor, what: str = "resampling") -> torch.Tensor:
    """The rows of ``x`` of every rank, concatenated in rank order (every rank's ``x`` has the same shape)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    try:
        dist.all_gather(parts, x.contiguous())
    except Exception as e:  # noqa: BLE001
        raise _lost(what, e) from None
    return torch.cat(parts)


def broadcast_(x: torch.Tensor, what: str = "resampling") -> torch.Tensor:
    """Rank 0's ``x`` on every rank, in place."""
    try:
        dist.broadcast(x, src=0)
    except Exception as e:  # noqa: BLE001
        raise _lost(what, e) from None
    return x


def barrier(what: str) -> None:
    try:
        dist.barrier()
    except Exception as e:  # noqa: BLE001
        raise _lost(what, e) from None


def any_rank(flag: bool, device: "str | torch.device" = "cpu", what: str = "a check") -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum_(t, what).item() > 0)


def same_on_every_rank(tensors: Sequence[torch.Tensor], what: str) -> bool:
    """Whether ``tensors`` are bit-identical on every rank (compared with rank 0's)."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]) if tensors else torch.zeros(1)
    ref = broadcast_(flat.clone(), what)
    return not any_rank(not torch.equal(ref, flat), flat.device, what)


def on_every_rank(fn: "Callable[[], T]", what: str) -> "T":
    """``fn()`` on every rank; if it fails on any, every rank raises (one line naming the ranks that failed).

    So a store on a path one node cannot see stops the whole job at once, not at its first collective.
    """
    error: "str | None" = None
    try:
        result = fn()
    except CircuitSAEError as e:
        if not (dist.is_available() and dist.is_initialized()):
            raise
        error, result = str(e), None
    if not (dist.is_available() and dist.is_initialized()):
        return result
    errors: list = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(errors, error)
    except Exception as e:  # noqa: BLE001
        raise _lost(what, e) from None
    failed = [(r, m) for r, m in enumerate(errors) if m is not None]
    if failed:
        ranks = ", ".join(str(r) for r, _ in failed)
        raise CircuitSAEError(f"{what} failed on rank {ranks}: {error or failed[0][1]}")
    return result
