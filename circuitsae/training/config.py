"""The training command's configuration: :class:`TrainConfig`, one field per flag of ``circuitsae train``."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

from circuitsae.config import model_dtype_option, option, validate
from circuitsae.data import corpora
from circuitsae.data.store import STORE_DTYPES
from circuitsae.dictionaries import registry
from circuitsae.errors import CircuitSAEError
from circuitsae.memory import parse_size
from circuitsae.sites import check_pattern

PARALLEL_MODES = ("data", "runs")
#: bounds of the sizes and counts a training takes (the memory a run needs is checked separately, once the
#: activations' width is known: :func:`circuitsae.training.runs.memory_plan`)
MAX_EXPANSION = 4096.0
MAX_COEFFICIENT = 1e6
MAX_ROWS = 1 << 30
MAX_COUNT = 1 << 40
MAX_SEED = (1 << 63) - 1
MAX_CTX_LEN = 1 << 20
#: the settings that apply only when training from the model (left out of a store training's fingerprint)
STREAM_FIELDS = (
    "model",
    "tokens",
    "corpus",
    "ctx_len",
    "heldout_fraction",
    "keep_bos",
    "chunk_contexts",
    "model_batch",
    "buffer_dtype",
    "model_dtype",
)
#: shuffle buffer (rows per site) and input-scale sample (rows per site) when not given
STORE_BUFFER_ROWS, STREAM_BUFFER_ROWS = 1 << 18, 1 << 16
STORE_SCALE_ROWS, STREAM_SCALE_ROWS = 1 << 17, 1 << 14


@dataclass
class TrainConfig:
    """One training pass: every (site, architecture, coefficient) combination is a run."""

    store: str = option("runs/acts", "activation store folder (from `circuitsae harvest`); not read with --model")
    model: "str | None" = option(
        None,
        "train straight from this model's forward passes instead of a store: built-in name (smollm2-135m, "
        "gemma3-270m), local HF folder or hub id",
    )
    tokens: int = option(
        1_000_000, "with --model: training tokens per site (1M, 500k and 2e6 are understood)", min=1, max=MAX_COUNT
    )
    corpus: str = option(
        corpora.DEFAULT_CORPUS, "with --model: corpus (mix, sotu, bbc, a folder, a .txt/.jsonl file, a HF dataset)"
    )
    ctx_len: int = option(128, "with --model: tokens per context, the start token included", min=2, max=MAX_CTX_LEN)
    heldout_fraction: float = option(
        0.05, "with --model: fraction of documents held out (the held-out metrics come from them)", above=0, max=0.99
    )
    keep_bos: bool = option(False, "with --model: also train on position 0 (the start token; a huge outlier)")
    chunk_contexts: int = option(
        128, "with --model: contexts per chunk, the unit the shuffle mixes (a store's shard)", min=1, max=MAX_ROWS
    )
    model_batch: int = option(16, "with --model: contexts per forward pass", min=1, max=MAX_ROWS)
    buffer_dtype: "str | None" = option(
        None,
        "with --model: dtype of the shuffle buffer: float16, bfloat16 or float32 (default: as a harvest's store)",
        choices=tuple(STORE_DTYPES),
    )
    model_dtype: "str | None" = model_dtype_option()
    buffer_rows: "int | None" = option(
        None,
        f"shuffle buffer, rows per site: half of it is handed out per round (default: {STORE_BUFFER_ROWS} from a "
        f"store, {STREAM_BUFFER_ROWS} with --model)",
        min=1,
        max=MAX_ROWS,
    )
    scale_rows: "int | None" = option(
        None,
        "first training rows per site on which the input scale is estimated (default: "
        f"{STORE_SCALE_ROWS} from a store, {STREAM_SCALE_ROWS} with --model: those rows cost extra forward passes)",
        min=1,
        max=MAX_ROWS,
    )
    memory_limit: "str | None" = option(
        None, "memory the training may plan for, e.g. 8G (default: what is available, or CIRCUITSAE_MEMORY_LIMIT)"
    )
    out: str = option("runs/saes", "output folder: one sub-folder per trained SAE, plus checkpoint and log")
    sites: tuple[str, ...] = option(
        (), "sites to train on, or patterns (all, resid.*, *.3, mlp.10-20, attn.1,4) (default: every site in the store)"
    )
    # checked against the registry in __post_init__ (not argparse choices: a bad name gets the same one-line error
    # from the API and the command line, and a class registered later is accepted)
    arch: tuple[str, ...] = option(
        ("relu", "gated"), "architectures: relu (Cunningham et al.), gated, topk, batchtopk, jumprelu (any of them)"
    )
    coefficients: tuple[float, ...] = option(
        (),
        "sparsity coefficients: α for relu, λ for gated and jumprelu, k (features per token) for topk and "
        "batchtopk; one run each per architecture (default: the per-arch default)",
        min=0,
        max=MAX_COEFFICIENT,
    )
    arch_coefficients: tuple[str, ...] = option(
        (),
        "per-architecture coefficients, ARCH=C1,C2,... (e.g. topk=32,64 jumprelu=0.3): those architectures "
        "take these instead of --coefficients, so a relu sweep and a TopK sweep train in one pass",
    )
    expansion: float = option(
        8.0,
        "dictionary size as a multiple of d for every run but gated (d_sae = expansion·d)",
        above=0,
        max=MAX_EXPANSION,
    )
    gated_expansion: "float | None" = option(
        None,
        "expansion for gated runs (default: same as relu; the Gated paper uses 3/4 for equal compute)",
        above=0,
        max=MAX_EXPANSION,
    )
    tied: bool = option(False, "relu: tie encoder and decoder (with --no-decoder-bias: Cunningham et al.'s exact form)")
    decoder_bias: bool = option(
        True,
        "relu: learn b_dec, subtracted before the encoder and added after the decoder (the Gated paper's baseline)",
    )
    lr: "float | None" = option(
        None,
        "learning rate (default: 1e-3 relu, 3e-4 gated, the papers'; for short runs 1e-3 suits both)",
        above=0,
    )
    batch_size: int = option(4096, "activations per step", min=1, max=MAX_ROWS)
    epochs: int = option(1, "passes over the training split", min=1, max=MAX_COUNT)
    lr_warmup: float = option(0.01, "fraction of steps over which the learning rate ramps up linearly", min=0, max=1)
    coef_warmup: float = option(
        0.05, "fraction of steps over which the sparsity coefficient ramps up linearly", min=0, max=1
    )
    resample_every: int = option(
        0,
        "resample dead features every N steps (0: every quarter of training if that is >= 50 steps; -1: never)",
        min=0,
        max=MAX_COUNT,
        special=(-1,),
    )
    checkpoint_every: int = option(200, "steps between checkpoints", min=1, max=MAX_COUNT)
    log_every: int = option(25, "steps between log lines (JSONL) and divergence checks", min=1, max=MAX_COUNT)
    eval_rows: int = option(65536, "held-out activations used for the final L0/FVU/γ of each run", min=1, max=MAX_ROWS)
    device: "str | None" = option(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    autocast: "bool | None" = option(
        None, "train under bfloat16 autocast (default: on for CUDA, off for the CPU; weights stay float32)"
    )
    seed: int = option(
        0, "seed for initialisation, batch order, resampling and (with --model) the contexts", min=0, max=MAX_SEED
    )
    stop_after: "int | None" = option(
        None, "stop (with a checkpoint) after this many steps; re-run to continue", min=1, max=MAX_COUNT
    )
    parallel: str = option(
        "data",
        "with several processes (torchrun): data (each rank trains every run on its share of every batch) "
        "or runs (the runs are split across ranks, no communication)",
        choices=PARALLEL_MODES,
    )

    def __post_init__(self) -> None:
        validate(self)
        unknown = [a for a in self.arch if a not in registry.TRAINABLE_NAMES]
        if unknown or not self.arch:
            raise CircuitSAEError(
                f"unknown architecture {unknown or '(none)'}: choose from {', '.join(registry.TRAINABLE_NAMES)}"
            )
        for site in self.sites:
            check_pattern(site)
        if self.model is not None and not self.sites:
            raise CircuitSAEError("with --model, name the sites to train: e.g. --sites all, resid.* or mlp.10-20")
        if self.memory_limit is not None:
            parse_size(self.memory_limit)
        per_arch = self.per_arch_coefficients()
        for arch in per_arch:
            if arch not in self.arch:
                raise CircuitSAEError(
                    f"--arch-coefficients names {arch}, which is not among the architectures trained "
                    f"({', '.join(self.arch)})"
                )
        for arch in self.arch:
            defaults = registry.get_trainable(arch).training
            for c in per_arch.get(arch) or self.coefficients:
                if defaults.k and (c != int(c) or c < 1):
                    raise CircuitSAEError(
                        f"{arch}: the coefficient is k, the features kept per token: a whole number >= 1, not {c:g}"
                    )

    def per_arch_coefficients(self) -> dict[str, tuple[float, ...]]:
        """``arch_coefficients`` parsed: architecture -> its coefficients."""
        out: dict[str, tuple[float, ...]] = {}
        for spec in self.arch_coefficients:
            arch, sep, values = spec.partition("=")
            try:
                parsed = tuple(float(v) for v in values.split(",")) if sep and values else None
            except ValueError:
                parsed = None
            if parsed is not None and not all(math.isfinite(c) and 0 <= c <= MAX_COEFFICIENT for c in parsed):
                raise CircuitSAEError(
                    f"--arch-coefficients {spec!r}: each coefficient must be a finite number in [0, {MAX_COEFFICIENT:g}]"
                )
            if parsed is None or arch not in registry.TRAINABLE_NAMES or arch in out:
                raise CircuitSAEError(
                    f"--arch-coefficients {spec!r}: write ARCH=C1,C2,... once per architecture, ARCH one of "
                    f"{', '.join(registry.TRAINABLE_NAMES)}"
                )
            out[arch] = parsed
        return out

    @property
    def streams(self) -> bool:
        """Whether this training reads the model's forward passes (``model`` set) rather than a store."""
        return self.model is not None

    @property
    def buffer(self) -> int:
        """The shuffle buffer in rows per site."""
        return self.buffer_rows or (STREAM_BUFFER_ROWS if self.streams else STORE_BUFFER_ROWS)

    @property
    def scale_sample(self) -> int:
        """Rows per site the input scale is estimated on."""
        return self.scale_rows or (STREAM_SCALE_ROWS if self.streams else STORE_SCALE_ROWS)

    def fingerprint(self) -> str:
        """What must match for a checkpoint to be resumed (not out/device/precision/stop_after/logging/memory)."""
        skip = ("out", "device", "autocast", "stop_after", "log_every", "parallel", "memory_limit")
        keep = {k: v for k, v in asdict(self).items() if k not in skip}
        # absent from older versions' checkpoints when unused or at their defaults: those still resume
        if not keep["arch_coefficients"]:
            del keep["arch_coefficients"]
        for name in ("buffer_rows", "scale_rows"):
            if keep[name] is None:
                del keep[name]
        if self.streams:
            del keep["store"]
        else:
            for name in STREAM_FIELDS:
                keep.pop(name, None)
        return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
