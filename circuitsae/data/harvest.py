"""Harvesting: run a model through nnsight over a corpus and store site activations.

One pass over the corpus records every requested site: the sites are visited
in forward order inside one nnsight trace, and the forward pass is stopped
right after the deepest site, so layers above it (and the unembedding) never
run. Activations go to an :class:`~circuitsae.data.store.ActivationStore`, shard by
shard; an interrupted harvest resumes at the first missing shard and produces
exactly the store an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from circuitsae import distributed
from circuitsae import sites as sites_mod
from circuitsae.config import model_dtype_option, option, validate
from circuitsae.data import corpora
from circuitsae.data.store import STORE_DTYPES, ActivationStore, StoreWriter, to_numpy
from circuitsae.errors import CircuitSAEError
from circuitsae.io import lock_folder, probe_folder
from circuitsae.memory import MemoryPlan, format_bytes
from circuitsae.models import (
    DEFAULT_MODEL,
    dtype_name,
    input_device,
    load_model,
    model_name,
    resolve_device,
    start_token_id,
)

#: bounds of a harvest's sizes (the disk a store needs is checked once the model's width is known)
MAX_TOKENS = 1 << 40
MAX_CTX_LEN = 1 << 20
MAX_BATCH = 1 << 20
MAX_SEED = (1 << 63) - 1


@dataclass
class HarvestConfig:
    """Settings of a harvest; every field is also a ``circuitsae harvest`` flag."""

    model: str = option(DEFAULT_MODEL, "model: built-in name, local HF folder or hub id")
    sites: tuple[str, ...] = option(
        ("resid.3",), "sites to record, e.g. resid.3 mlp.3 attn.4, or patterns: all, resid.*, *.3, mlp.10-20, attn.1,4"
    )
    tokens: int = option(100_000, "activation vectors (tokens) to store per site for training", min=1, max=MAX_TOKENS)
    out: str = option("runs/activations", "output folder of the activation store")
    corpus: str = option(
        corpora.DEFAULT_CORPUS, "corpus: mix, sotu, bbc, a folder, a .txt/.jsonl file, or a HF dataset"
    )
    ctx_len: int = option(128, "tokens per context, the start token included", min=2, max=MAX_CTX_LEN)
    batch_size: int = option(16, "contexts per forward pass", min=1, max=MAX_BATCH)
    dtype: str | None = option(
        None,
        "storage dtype: float16, bfloat16 or float32 (default: float16; bfloat16 for families that overflow it)",
        choices=tuple(STORE_DTYPES),
    )
    seed: int = option(0, "seed of the document and context order", min=0, max=MAX_SEED)
    heldout_tokens: int | None = option(
        None,
        "tokens to store from the held-out split: the SAEs' held-out metrics come from them; 0 stores none (default: "
        "5%% of --tokens)",
        min=0,
        max=MAX_TOKENS,
    )
    heldout_fraction: float = option(
        0.05, "fraction of documents reserved for the held-out split, in (0, 1)", above=0, max=0.99
    )
    keep_bos: bool = option(False, "also store position 0 (the start token; a huge outlier)")
    shard_contexts: int = option(128, "contexts per shard (the unit of resumption)", min=1, max=MAX_BATCH)
    device: str | None = option(None, "device for the model: cpu, cuda, cuda:N (default: cuda if available)")
    model_dtype: str | None = model_dtype_option()

    def __post_init__(self) -> None:
        validate(self)
        if not self.sites:
            raise CircuitSAEError("name at least one site, e.g. resid.3")
        for s in self.sites:
            sites_mod.check_pattern(s)

    @property
    def rows_per_context(self) -> int:
        return self.ctx_len if self.keep_bos else self.ctx_len - 1

    def contexts_for(self, split: str) -> int:
        """Contexts needed to store at least the requested tokens of ``split``."""
        tokens = self.tokens if split == "train" else self.heldout_tokens
        if tokens is None:  # default held-out size: 5% of the training tokens, >= 1 context
            tokens = max(self.rows_per_context, self.tokens // 20)
        return math.ceil(tokens / self.rows_per_context)


def _return_freed_memory() -> None:
    """Give freed heap back to the OS (glibc only; elsewhere a no-op).

    The forward pass frees tens of MB of temporaries per batch; glibc keeps
    them fragmented in the heap, so without this a long harvest's resident
    memory creeps up shard by shard although nothing is leaked (measured in
    benchmarks/harvest.py).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def storable(x: torch.Tensor, site: str, dtype: str) -> torch.Tensor:
    """``x`` in the storage dtype; raises (before anything is written) if a value is not finite there."""
    stored = x.to(STORE_DTYPES[dtype][1])
    if not bool(torch.isfinite(stored).all()):
        if not bool(torch.isfinite(x).all()):
            raise CircuitSAEError(
                f"the model produced NaN or inf at {site} (a float16 model overflowing? use --model-dtype bfloat16)"
            )
        raise CircuitSAEError(
            f"activations at {site} reach {float(x.abs().max()):.3g}, beyond {dtype}'s range "
            f"({torch.finfo(STORE_DTYPES[dtype][1]).max:.3g}): harvest with --dtype bfloat16 into a new --out"
        )
    return stored


def check_resources(cfg: HarvestConfig, meta: dict, device: Any = "cpu") -> MemoryPlan:
    """Refuse, in one line, a harvest whose memory or store would not fit, before anything is tokenised or written.

    Memory: every context's token ids, one shard's buffers (every site, the storage dtype) and a forward pass
    (a generous estimate: ``4 · batch · ctx · (32·d + 16·ctx)`` bytes, the residual stream's temporaries and
    the attention scores of one layer). Disk: the store's shards, less what the output folder already holds
    (a resumed harvest), against the free space of the file system it is on.
    """
    d, n_sites = int(meta["d"]), len(meta["sites"])
    itemsize = np.dtype(STORE_DTYPES[meta["dtype"]][0]).itemsize
    contexts = sum(info["contexts"] for info in meta["splits"].values())
    rows = sum(info["rows"] for info in meta["splits"].values())
    plan = MemoryPlan(f"harvesting {n_sites} site(s) of width {d}").extend(
        [
            ("token ids", 8 * contexts * cfg.ctx_len),
            ("shard buffers", itemsize * cfg.shard_contexts * cfg.rows_per_context * d * n_sites),
            ("forward pass", 4 * cfg.batch_size * cfg.ctx_len * (32 * d + 16 * cfg.ctx_len)),
        ]
    )
    plan.check(device)
    need = itemsize * rows * d * n_sites
    out = Path(cfg.out)
    have = sum(f.stat().st_size for f in out.glob("*.npy")) if out.is_dir() else 0
    probe = next(p for p in (out, *out.absolute().parents) if p.exists())
    free = shutil.disk_usage(probe).free
    if need - have > free:
        raise CircuitSAEError(
            f"the store would take {format_bytes(need)} on disk ({format_bytes(need - have)} still to write) but "
            f"{probe} has {format_bytes(free)} free: harvest fewer tokens or sites, or choose another --out"
        )
    return plan


@torch.no_grad()
def record(model: Any, sites: list[sites_mod.Site], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Activations ``[batch, seq, d]`` of ``sites`` (in forward order) on ``input_ids``.

    One nnsight trace; the forward pass stops after the last site.
    """
    saved: dict[str, torch.Tensor] = {}  # filled in place: names bound inside a
    with model.trace(input_ids) as tracer:  # trace by a comprehension do not escape it
        for s in sites:
            saved[str(s)] = sites_mod.read(model, s).save()
        tracer.stop()
    return {k: v.detach() for k, v in saved.items()}


def harvest(
    config: HarvestConfig | None = None, *, model: Any = None, progress: bool = True, **overrides: Any
) -> ActivationStore:
    """Harvest activations into a store and return it opened for reading.

    Args:
        config: a :class:`HarvestConfig`; keyword ``overrides`` replace its fields
            (``harvest(sites=["resid.3"], tokens=50_000, out="acts")`` works alone).
        model: an already loaded model (from :func:`circuitsae.load_model`) to use
            instead of loading ``config.model``; its name is recorded.
        progress: show a tqdm bar with tokens/s.

    Re-running with the same settings resumes an interrupted harvest (or
    returns at once if it is complete); a folder holding a different store is
    refused, and so is a folder another process is writing (checked, with the
    folder's writability, before the model loads).
    """
    cfg = HarvestConfig(**{**(asdict(config) if config else {}), **overrides})
    world = distributed.init(resolve_device(cfg.device).type if model is None else input_device(model).type)
    if world.active and model is None and resolve_device(cfg.device) == torch.device("cuda"):
        cfg.device = f"cuda:{world.local_rank}"  # one GPU per rank
    with contextlib.ExitStack() as held:

        def claim() -> None:  # rank 0 holds the folder; if it cannot, every rank stops with its one line
            if world.main:
                held.enter_context(lock_folder(cfg.out, "harvest"))
                probe_folder(cfg.out)

        distributed.on_every_rank(claim, "taking the output folder")
        return _harvest(cfg, world, model, progress)


def _harvest(cfg: HarvestConfig, world: distributed.World, model: Any, progress: bool) -> ActivationStore:
    """:func:`harvest` into the claimed folder."""
    if model is None:
        model = load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
    cfg.model = model_name(model)
    cfg.model_dtype = dtype_name(model)
    if cfg.dtype is None:  # float16 halves the store, unless the family's activations do not fit it (Gemma)
        cfg.dtype = "bfloat16" if sites_mod.layout(model).float16_overflows else "float16"
    sites = sites_mod.resolve(model, cfg.sites)
    cfg.sites = tuple(str(s) for s in sites)
    tok = model.tokenizer
    n_ctx = {split: cfg.contexts_for(split) for split in corpora.SPLITS}
    meta = {
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("out", "device", "batch_size")}
        | {"heldout_tokens": n_ctx["heldout"] * cfg.rows_per_context},
        "sites": list(cfg.sites),
        "d": sites_mod.d_model(model),
        "dtype": cfg.dtype,
        "rows_per_context": cfg.rows_per_context,
        "first_position": 0 if cfg.keep_bos else 1,
        "start_token_id": start_token_id(tok),
        "splits": {
            s: {"contexts": n, "shards": math.ceil(n / cfg.shard_contexts), "rows": n * cfg.rows_per_context}
            for s, n in n_ctx.items()
        },
    }
    check_resources(cfg, meta, device=input_device(model))
    # Tokenise first: a corpus too small or empty fails before anything is written.
    ids = {
        split: corpora.contexts(tok, n, cfg.ctx_len, cfg.corpus, split, cfg.seed, cfg.heldout_fraction)
        for split, n in n_ctx.items()
    }
    # rank 0 creates the store (meta.json) first; the other ranks then open it as a resumed one
    writer = StoreWriter(cfg.out, meta) if world.main else None
    if world.active:
        distributed.barrier("creating the store")
        writer = distributed.on_every_rank(
            lambda: writer or StoreWriter(cfg.out, meta, create=False), "opening the store"
        )
    assert writer is not None
    first = meta["first_position"]
    device = input_device(model)
    # rank r writes the shards i ≡ r (mod world size) of each split: the same contexts, batches and bytes as one process
    mine = {
        split: [i for i in range(info["shards"]) if i % world.size == world.rank]
        for split, info in meta["splits"].items()
    }

    def shard_rows(split: str, i: int) -> int:
        return min(cfg.shard_contexts, n_ctx[split] - i * cfg.shard_contexts) * cfg.rows_per_context

    bar = tqdm(
        total=sum(shard_rows(s, i) for s, ids_ in mine.items() for i in ids_),
        unit="tok",
        unit_scale=True,
        disable=not progress or not world.main,
        desc=f"harvest {' '.join(cfg.sites)}" + (f" (rank 0 of {world.size})" if world.active else ""),
        dynamic_ncols=True,
    )
    with bar:
        for split in n_ctx:
            todo = [i for i in mine[split] if not writer.has_shard(split, i)]
            bar.update(sum(shard_rows(split, i) for i in mine[split] if i not in todo))
            for i in todo:
                shard_ids = ids[split][i * cfg.shard_contexts : (i + 1) * cfg.shard_contexts]
                rows = shard_ids.shape[0] * cfg.rows_per_context
                # One buffer per site in the storage dtype, filled in place: the
                # same few allocations every shard, so memory stays flat.
                buf = {str(s): np.empty((rows, meta["d"]), STORE_DTYPES[cfg.dtype][0]) for s in sites}
                for b in range(0, shard_ids.shape[0], cfg.batch_size):
                    batch = shard_ids[b : b + cfg.batch_size]
                    r0, r1 = b * cfg.rows_per_context, (b + batch.shape[0]) * cfg.rows_per_context
                    for k, a in record(model, sites, batch.to(device)).items():
                        buf[k][r0:r1] = to_numpy(
                            storable(a[:, first:].reshape(-1, a.shape[-1]), k, cfg.dtype), cfg.dtype
                        )
                    bar.update(batch.shape[0] * cfg.rows_per_context)
                writer.write_shard(split, i, i * cfg.shard_contexts, shard_ids, buf)
                del buf
                _return_freed_memory()
    if world.active:
        distributed.barrier("waiting for every rank's shards")
    if world.main:
        writer.finish(tokens_stored={s: v["rows"] for s, v in meta["splits"].items()})
    if world.active:
        distributed.barrier("marking the store complete")
    return ActivationStore(cfg.out)
