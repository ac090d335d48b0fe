"""Activations straight from the model: the source a training reads instead of a store.

A :class:`ModelStream` cuts the corpus into contexts exactly as a harvest does (same tokenizer, corpus, split, seed,
context length), groups them into *chunks* of ``chunk_contexts`` contexts — the stream's shards — and computes a
chunk's activations at every requested site when the shuffle asks for it: one nnsight trace per
``batch_contexts`` contexts that stops after the deepest site (:func:`circuitsae.data.harvest.record`), rows converted
to the buffer dtype (float16 by default, bfloat16 for families whose activations overflow it, as the store).

The shuffle is the store reader's (:func:`circuitsae.data.reader.shuffled_batches`): the same seeded schedule over
the chunks, a pool of ``buffer_rows`` rows per site (here a buffer of slots, so memory stays bounded: rows are copied
in once and gathered into batches), half of the pool handed out per round. So training from the model and training
from a store harvested from the same contexts into shards of the same size, in the same dtype, read with the same
buffer, see the same batches bit for bit (tested), and one forward pass serves every site.

A chunk is computed in the caller's thread when the schedule reaches it (the forward pass is the heavy work, on the
device the SAEs train on). A resumed training skips the batches it has seen; :func:`needed_shards` tells which
chunks still hand out a row, and the others are not computed (their places in the pool are filled with zeros that
no batch reads).

**Several processes** (data-parallel training): each rank takes its own contiguous range of the contexts (the
first ``n // world`` contexts for rank 0, and so on; the last ``n mod world`` are not used) and its own share of
every batch (``batch_size // world`` rows) from a shuffle of its own range. Each rank then runs forward passes over
a different ``1/world`` of the tokens, which is what spreads the model's cost; splitting the sites across ranks
instead would make every rank run the forward pass up to its deepest site. The batches differ from one process's
(another world size, another training), so a resume needs the same world size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from circuitsae import sites as sites_mod
from circuitsae.data import corpora
from circuitsae.data.harvest import record, storable
from circuitsae.data.reader import needed_shards, shuffled_batches
from circuitsae.data.store import STORE_DTYPES
from circuitsae.errors import CircuitSAEError
from circuitsae.models import input_device, model_name


class ModelStream:
    """An activation source computed from ``model``'s forward passes, with the store's reading interface.

    Args:
        model: a model from :func:`circuitsae.load_model` (any device and dtype).
        sites: site names or patterns (``all``, ``resid.*``, ...), expanded against the model.
        tokens: training tokens (activation rows per site) over the whole run, all ranks together (0: a stream of
            held-out rows only).
        corpus: the corpus the contexts are cut from, as for a harvest.
        ctx_len: tokens per context, the start token included.
        seed: the seed of the document and context order.
        heldout_fraction: the fraction of documents held out.
        keep_bos: also keep position 0 (the start token).
        heldout_rows: held-out rows per site available for evaluation (from the corpus's held-out split).
        chunk_contexts: contexts per chunk (the unit of the shuffle, like a store's shard).
        batch_contexts: contexts per forward pass.
        dtype: buffer dtype (``float16``, ``bfloat16``, ``float32``; default as a harvest's).
        ranks: ``(rank, world_size)``: this process's range of the contexts (see the module docstring).
        progress: a tqdm bar of the forward passes for the held-out rows and the input-scale sample.
    """

    def __init__(
        self,
        model: Any,
        sites: Sequence[str],
        *,
        tokens: int,
        corpus: str = corpora.DEFAULT_CORPUS,
        ctx_len: int = 128,
        seed: int = 0,
        heldout_fraction: float = 0.05,
        heldout_rows: int = 0,
        keep_bos: bool = False,
        chunk_contexts: int = 128,
        batch_contexts: int = 16,
        dtype: "str | None" = None,
        ranks: tuple[int, int] = (0, 1),
        progress: bool = False,
    ) -> None:
        self.model = model
        self.site_objs = sites_mod.resolve(model, sites)
        self.sites = [str(s) for s in self.site_objs]
        self.d = sites_mod.d_model(model)
        if dtype is None:
            dtype = "bfloat16" if sites_mod.layout(model).float16_overflows else "float16"
        if dtype not in STORE_DTYPES:
            raise CircuitSAEError(f"buffer dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.storage_dtype = STORE_DTYPES[dtype][1]
        self.first_position = 0 if keep_bos else 1
        self.rows_per_context = ctx_len - self.first_position
        self.chunk_contexts, self.batch_contexts = chunk_contexts, batch_contexts
        self.ranks = ranks
        self.progress = progress
        self.settings = {
            "model": model_name(model),
            "corpus": corpus,
            "ctx_len": ctx_len,
            "seed": seed,
            "heldout_fraction": heldout_fraction,
            "keep_bos": keep_bos,
            "tokens": tokens,
            "chunk_contexts": chunk_contexts,
            "dtype": dtype,
            "world_size": ranks[1],
        }
        tok = model.tokenizer
        n_train = math.ceil(tokens / self.rows_per_context)
        rank, world = ranks
        if 0 < n_train < world:
            raise CircuitSAEError(f"{tokens} tokens make {n_train} contexts, fewer than the {world} ranks")
        ids = corpora.contexts(tok, n_train, ctx_len, corpus, "train", seed, heldout_fraction)
        share = n_train // world
        # "all": every rank's contexts, for the input-scale sample (the first rows of the run, the same on every rank)
        self.ids = {"train": ids[rank * share : (rank + 1) * share], "all": ids}
        n_heldout = math.ceil(heldout_rows / self.rows_per_context) if heldout_rows else 0
        self.ids["heldout"] = corpora.contexts(tok, n_heldout, ctx_len, corpus, "heldout", seed, heldout_fraction)

    # -- description ---------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.settings["model"]

    def __repr__(self) -> str:
        return (
            f"ModelStream({self.model_name}, {len(self.sites)} sites, {self.n_rows('train')} training rows"
            + (f" (rank {self.ranks[0]} of {self.ranks[1]})" if self.ranks[1] > 1 else "")
            + ")"
        )

    def describe(self) -> str:
        """How the source is named in messages."""
        return f"forward passes of {self.model_name} over {self.settings['corpus']}"

    def n_rows(self, split: str = "train") -> int:
        """Activation rows per site in ``split`` (this rank's, for training)."""
        return int(self.ids[split].shape[0]) * self.rows_per_context

    def n_batches(self, batch_size: int, *, epochs: int = 1, drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields (``batch_size`` is the global batch, split over the ranks)."""
        n, b = self.n_rows("train"), batch_size // self.ranks[1]
        return epochs * (n // b + int(bool(n % b) and not drop_last))

    def chunk_rows(self, split: str = "train") -> list[int]:
        n = int(self.ids[split].shape[0])
        return [(min(self.chunk_contexts, n - i) * self.rows_per_context) for i in range(0, n, self.chunk_contexts)]

    # -- computing activations ----------------------------------------------------------
    @torch.no_grad()
    def chunk(self, index: int, split: str = "train", names: "Sequence[str] | None" = None) -> list[torch.Tensor]:
        """Chunk ``index`` of ``split``: one ``[rows, d]`` tensor per site (``names``, default all) in the buffer
        dtype, on the CPU, rows in context order (position 0 left out unless ``keep_bos``)."""
        names = list(self.sites if names is None else names)
        wanted = [s for s in self.site_objs if str(s) in names]
        ids = self.ids[split][index * self.chunk_contexts : (index + 1) * self.chunk_contexts]
        out = {s: torch.empty(ids.shape[0] * self.rows_per_context, self.d, dtype=self.storage_dtype) for s in names}
        device = input_device(self.model)
        for b in range(0, ids.shape[0], self.batch_contexts):
            batch = ids[b : b + self.batch_contexts]
            r0, r1 = b * self.rows_per_context, (b + batch.shape[0]) * self.rows_per_context
            for name, a in record(self.model, wanted, batch.to(device)).items():
                rows = a[:, self.first_position :].reshape(-1, a.shape[-1])
                out[name][r0:r1] = storable(rows, name, self.dtype).cpu()
        return [out[s] for s in names]

    def samples(self, names: Sequence[str], split: str, max_rows: int) -> Iterator[list[torch.Tensor]]:
        """The first ``max_rows`` rows of ``split`` in context order, chunk by chunk (one tensor per site); for
        ``"train"`` the first rows of the whole run, whatever this rank's range (the same sample on every rank)."""
        split = "all" if split == "train" else split
        have, rows = 0, self.chunk_rows(split)
        bar = tqdm(
            total=min(max_rows, sum(rows)),
            unit="tok",
            unit_scale=True,
            desc="input-scale sample" if split == "all" else f"{split} rows",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        with bar:
            for i, n in enumerate(rows):
                if have >= max_rows:
                    return
                parts = self.chunk(i, split, names)
                take = min(n, max_rows - have)
                yield [p[:take] for p in parts]
                have += take
                bar.update(take)

    def sample(self, names: Sequence[str], split: str, max_rows: int) -> dict[str, torch.Tensor]:
        """:meth:`samples` concatenated: ``{site: [rows, d]}`` in the buffer dtype."""
        parts = list(self.samples(names, split, max_rows))
        if not parts:
            raise CircuitSAEError(f"no {split} rows to sample from {self.describe()}")
        return {s: torch.cat([p[k] for p in parts]) for k, s in enumerate(names)}

    def batches(
        self,
        names: Sequence[str],
        batch_size: int,
        *,
        epochs: int = 1,
        seed: int = 0,
        device: "str | torch.device" = "cpu",
        dtype: torch.dtype = torch.float32,
        buffer_rows: int = 1 << 16,
        drop_last: bool = False,
        skip: int = 0,
        part: tuple[int, int] = (0, 1),
        **_: Any,
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Shuffled batches (a tuple with one tensor per site in ``names``) of this rank's contexts.

        ``batch_size`` is the global batch; ``part=(rank, world)`` must be the stream's ``ranks``: each rank takes
        ``batch_size // world`` rows per batch from its own range. ``skip`` drops the first batches, computing
        only the chunks the later ones need.
        """
        if tuple(part) != tuple(self.ranks):
            raise CircuitSAEError(f"this stream serves rank {self.ranks}, not {tuple(part)}")
        names = list(names)
        index = [self.sites.index(s) for s in names]
        rows = self.chunk_rows("train")
        local = batch_size // self.ranks[1]
        needed = needed_shards(
            rows, local, epochs=epochs, seed=seed, buffer_rows=buffer_rows, drop_last=drop_last, skip=skip
        )
        loads = iter(needed)

        def load(i: int) -> list[torch.Tensor]:
            if next(loads):
                return self.chunk(i, "train", names)
            return [torch.zeros(rows[i], self.d, dtype=self.storage_dtype) for _ in index]

        def where(i: int, k: int) -> str:
            return f"chunk {i} of {self.describe()} at {names[k]}"

        stream = shuffled_batches(
            load,
            rows,
            where,
            local,
            width=self.d,
            storage_dtype=self.storage_dtype,
            n_sites=len(index),
            epochs=epochs,
            seed=seed,
            device=device,
            dtype=dtype,
            buffer_rows=buffer_rows,
            drop_last=drop_last,
            skip=skip,
            prefetch=0,
            pool="slots",
        )
        return (tuple(b) for b in stream)
