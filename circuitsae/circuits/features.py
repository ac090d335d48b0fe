"""What one dictionary feature reads and writes (REFERENCE §5, Cunningham et al. §5.1–5.2).

For feature i of a dictionary at a site, with codes c_i(x) and unit direction f_i:

* **input side** — c_i over every row of an activation store
  (:func:`feature_activations`), the contexts where it fires most and at
  random (:func:`top_contexts`, :func:`random_contexts`), and the histogram
  of the tokens it fires on by activation range (:func:`token_histogram`, the
  paper's Fig. 4 left);
* **output side** — the *less-than-rank-one ablation* ``x ← x − c_i f_i`` at
  the positions where c_i > 0 (:func:`ablate`): the feature is lowered along
  its own direction just until it is off, nothing else moves. The mean change
  of next-token log-probabilities it causes at those positions
  (:func:`logit_effect`, Fig. 4 right — **choice**: the paper plots the change
  of the *logits*; a logit change is only defined up to a constant shared by
  every token, which the softmax ignores, so raw logit differences mix "this
  token moved" with "all tokens moved together". Log-probabilities remove that
  constant, and the ranking of tokens at one position is the same either
  way), and the tokens the direction itself
  promotes: ``W_U · (N(f_i) − N(0))`` with N the model's final norm
  (:func:`decoder_unembed`; subtracting N(0) drops a LayerNorm's bias, which
  is the same for every direction, and is 0 for RMSNorm).

:func:`analyse_feature` gathers all of it in a :class:`FeatureReport`, which
:meth:`FeatureReport.write` saves as ``feature.json`` plus two PNGs.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from circuitsae import sites as sites_mod
from circuitsae.data.store import ActivationStore
from circuitsae.dictionaries import Dictionary
from circuitsae.errors import CircuitSAEError
from circuitsae.interventions.splice import check_dictionary, default_start
from circuitsae.io import atomic_write
from circuitsae.models import input_device


# -- the ablation primitive ------------------------------------------------------
def ablation_delta(dictionary: Dictionary, x: torch.Tensor, feature: int, start: int = 0) -> torch.Tensor:
    """c_i f_i at every position of ``x`` ``[..., T, d]`` where c_i > 0 (and position ≥ ``start``), else 0."""
    feats = torch.tensor([feature], device=x.device)
    c = dictionary.encode_features(x.to(dictionary.W_dec.dtype), feats)[..., 0].clamp_min(0)
    c[..., :start] = 0
    return (c[..., None] * dictionary.directions[feature]).to(x.dtype)


def ablate(dictionary: Dictionary, x: torch.Tensor, feature: int, start: int = 0) -> torch.Tensor:
    """Less-than-rank-one ablation: ``x − c_i f_i`` where c_i > 0, ``x`` elsewhere."""
    return x - ablation_delta(dictionary, x, feature, start)


@contextlib.contextmanager
def site_hook(model: Any, site: str, edit: Any) -> Iterator[None]:
    """While open, the output x of ``site`` is replaced by ``edit(x)`` in every forward pass."""

    def hook(_mod: Any, _inp: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (edit(out[0]), *out[1:])
        return edit(out)

    handle = sites_mod.module(sites_mod._hf_module(model), site).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# -- input side --------------------------------------------------------------------
@torch.no_grad()
def site_codes(
    dictionary: Dictionary,
    store: ActivationStore,
    site: str,
    features: Sequence[int],
    split: str = "train",
    max_rows: "int | None" = None,
    progress: bool = True,
) -> torch.Tensor:
    """Codes ``[rows, len(features)]`` of some features over the store's rows, in store order, shard by shard."""
    out, n = [], 0
    feats = torch.as_tensor(list(features), dtype=torch.long)
    shards = range(len(store._split(split)))
    for i in tqdm(shards, desc=f"encoding {site}", unit="shard", disable=not progress, leave=False):
        if max_rows is not None and n >= max_rows:
            break
        x = store.shard(store._site(site), split, i).to(dictionary.W_dec.device, dictionary.W_dec.dtype)
        for j in range(0, x.shape[0], 8192):
            out.append(dictionary.encode_features(x[j : j + 8192], feats.to(x.device)).float().cpu())
        n += x.shape[0]
    if not out:
        raise CircuitSAEError(f"store {store.root} has no {split} activations")
    codes = torch.cat(out)
    return codes if max_rows is None else codes[:max_rows]


def feature_activations(
    dictionary: Dictionary, store: ActivationStore, site: str, feature: int, split: str = "train", progress: bool = True
) -> torch.Tensor:
    """c_i over every stored row of ``split`` (``[rows]``, store order); raises if the feature never fires."""
    if not 0 <= feature < dictionary.d_dict:
        raise CircuitSAEError(
            f"feature {feature} does not exist: features of this dictionary are 0..{dictionary.d_dict - 1}"
        )
    acts = site_codes(dictionary, store, site, [feature], split, progress=progress)[:, 0]
    if not (acts > 0).any():
        raise CircuitSAEError(
            f"feature {feature} at {site} never fires: density 0 over {len(acts)} {split} rows of {store.root}"
        )
    return acts


def row_tokens(store: ActivationStore, split: str = "train") -> torch.Tensor:
    """The token id of every stored row ``[rows]`` (the token whose activation the row is)."""
    first, per = int(store.meta["first_position"]), int(store.meta["rows_per_context"])
    return store.tokens(split)[:, first : first + per].reshape(-1)


#: tokens of the paper's example features (Cunningham et al. §5: closing parenthesis, apostrophe, period, " the")
EXAMPLE_TOKENS = (")", "'", ".", " the")


@torch.no_grad()
def find_token_feature(
    dictionary: Dictionary,
    store: ActivationStore,
    site: str,
    tokenizer: Any,
    tokens: Sequence[str] = EXAMPLE_TOKENS,
    max_rows: int = 100_000,
    progress: bool = True,
) -> dict[str, Any]:
    """The feature that best picks out one of ``tokens``: highest F1 of "fires" vs "is the token".

    Over the first ``max_rows`` stored rows, for each single-token string t and
    feature i: precision = P(token is t | c_i > 0), recall = P(c_i > 0 | token
    is t). Returns ``{"feature", "token", "precision", "recall", "f1"}``.
    """
    ids = {t: tokenizer.encode(t, add_special_tokens=False) for t in tokens}
    ids = {t: v[0] for t, v in ids.items() if len(v) == 1}
    if not ids:
        raise CircuitSAEError(f"none of {list(tokens)} is a single token for this tokenizer")
    tok = row_tokens(store)[:max_rows]
    fires_on = torch.zeros(len(ids), dictionary.d_dict, device="cpu")
    fires = torch.zeros(dictionary.d_dict, device="cpu")
    n = 0
    shards = range(len(store._split("train")))
    for i in tqdm(shards, desc=f"token features {site}", unit="shard", disable=not progress, leave=False):
        if n >= len(tok):
            break
        x = store.shard(store._site(site), "train", i)[: len(tok) - n]
        x = x.to(dictionary.W_dec.device, dictionary.W_dec.dtype)
        on = (dictionary.encode(x) > 0).float().cpu()  # [rows, d_dict]
        t = tok[n : n + len(x)]
        fires += on.sum(0)
        for k, tid in enumerate(ids.values()):
            fires_on[k] += on[t == tid].sum(0)
        n += len(x)
    count = torch.tensor([float((tok == tid).sum()) for tid in ids.values()], device="cpu")[:, None]
    precision = fires_on / fires.clamp(min=1)
    recall = fires_on / count.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    k, feature = divmod(int(f1.argmax()), dictionary.d_dict)
    if f1[k, feature] <= 0:
        raise CircuitSAEError(f"no feature at {site} fires on any of {list(ids)} in {n} rows")
    return {
        "feature": feature,
        "token": list(ids)[k],
        "precision": float(precision[k, feature]),
        "recall": float(recall[k, feature]),
        "f1": float(f1[k, feature]),
    }


@dataclass
class Context:
    """One stored context seen through a feature: its tokens and c_i at each of them."""

    context: int  # index into store.tokens(split)
    position: int  # the firing position
    activation: float  # c_i there
    tokens: list[str]  # every token of the context, decoded one by one
    activations: list[float]  # c_i per token (0 before the store's first_position)

    def marked(self, before: int = 12, after: int = 4, mark: str = "[[{}]]", escape: Any = str) -> str:
        """The text around the firing token, which is marked ``[[like this]]`` (``mark``; ``escape`` each token,
        e.g. ``html.escape`` with ``mark="<b>{}</b>"``)."""
        lo, hi = max(0, self.position - before), min(len(self.tokens), self.position + after + 1)
        toks = enumerate(map(escape, self.tokens[lo:hi]), lo)
        parts = [mark.format(t) if p == self.position else t for p, t in toks]
        return ("…" if lo else "") + "".join(parts).replace("\n", "↵") + ("…" if hi < len(self.tokens) else "")


def _context(acts: torch.Tensor, store: ActivationStore, tokenizer: Any, row: int, split: str) -> Context:
    ctx, pos = store.locate(row, split)
    per, first = int(store.meta["rows_per_context"]), int(store.meta["first_position"])
    ids = store.tokens(split)[ctx].tolist()
    values = [0.0] * first + acts[ctx * per : (ctx + 1) * per].tolist()
    return Context(ctx, pos, float(acts[row]), [tokenizer.decode([t]) for t in ids], values)


def top_contexts(
    acts: torch.Tensor, store: ActivationStore, tokenizer: Any, k: int = 10, split: str = "train"
) -> list[Context]:
    """The ``k`` contexts with the highest c_i (``acts`` from :func:`feature_activations`), one row each."""
    per = int(store.meta["rows_per_context"])
    best = acts.view(-1, per).max(-1)
    order = best.values.argsort(descending=True)[:k]
    order = order[best.values[order] > 0]
    return [_context(acts, store, tokenizer, int(c) * per + int(best.indices[c]), split) for c in order]


def random_contexts(
    acts: torch.Tensor, store: ActivationStore, tokenizer: Any, k: int = 10, split: str = "train", seed: int = 0
) -> list[Context]:
    """``k`` firing rows drawn uniformly (seeded), from distinct contexts."""
    per = int(store.meta["rows_per_context"])
    rows = (acts > 0).nonzero().flatten()
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed), device="cpu")]
    picked, seen = [], set()
    for r in rows.tolist():
        if r // per not in seen:
            seen.add(r // per)
            picked.append(_context(acts, store, tokenizer, r, split))
            if len(picked) == k:
                break
    return picked


def token_histogram(
    acts: torch.Tensor, tokens: torch.Tensor, tokenizer: Any, bins: int = 12, top: int = 8
) -> dict[str, Any]:
    """Counts of firing rows by activation range (``bins`` equal bins over (0, max]), split by token.

    The ``top`` most frequent firing tokens get a row each; the rest are summed
    under ``"other"``. Returns ``{"edges", "tokens", "counts"}`` with ``counts``
    ``[len(tokens)][bins]``.
    """
    fire = acts > 0
    a, t = acts[fire], tokens[fire]
    edges = torch.linspace(0, float(a.max()), bins + 1, device="cpu")
    which = torch.bucketize(a, edges[1:-1], right=True)
    common = [tok for tok, _ in Counter(t.tolist()).most_common(top)]
    counts = []
    for tok in common:
        counts.append(torch.bincount(which[t == tok], minlength=bins).tolist())
    rest = ~torch.isin(t, torch.tensor(common, dtype=t.dtype, device="cpu"))
    counts.append(torch.bincount(which[rest], minlength=bins).tolist())
    names = [repr(tokenizer.decode([tok])) for tok in common] + ["other"]
    return {"edges": edges.tolist(), "tokens": names, "counts": counts}


# -- output side -------------------------------------------------------------------
@torch.no_grad()
def logit_effect(
    model: Any,
    dictionary: Dictionary,
    site: str,
    input_ids: torch.Tensor,
    feature: int,
    k: int = 10,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Mean change of next-token log-probs when feature i is ablated (x ← x − c_i f_i where c_i > 0).

    Log-probabilities, not the paper's raw logits: the same ranking at each position, without the shift
    shared by every token that a logit difference also carries (see the module docstring).

    Averaged over the (context, position) pairs of ``input_ids`` ``[n, T]``
    where the feature fires. Returns ``{"positions", "down", "up"}``: the ``k``
    tokens whose log-prob falls most (the feature promotes them) and rises most,
    each as ``[token, mean Δ log p]``.
    """
    check_dictionary(model, site, dictionary)
    hf = sites_mod._hf_module(model)
    device = input_device(model)
    start = default_start(dictionary)
    total, positions, fired = None, 0, {}

    def edit(x: torch.Tensor) -> torch.Tensor:
        delta = ablation_delta(dictionary, x, feature, start)
        fired["mask"] = delta.ne(0).any(-1)
        return x - delta

    for b in range(0, len(input_ids), batch_size):
        ids = input_ids[b : b + batch_size].to(device)
        clean = hf(input_ids=ids).logits.float().log_softmax(-1)
        with site_hook(model, site, edit):
            ablated = hf(input_ids=ids).logits.float().log_softmax(-1)
        mask = fired["mask"].to(clean.device)
        diff = (ablated - clean)[mask].sum(0)
        total = diff if total is None else total + diff
        positions += int(mask.sum())
    if not positions:
        raise CircuitSAEError(f"feature {feature} does not fire in the {len(input_ids)} contexts given")
    mean = (total / positions).cpu()
    tok = model.tokenizer

    def rows(idx: torch.Tensor) -> list:
        return [[tok.decode([int(i)]), float(mean[i])] for i in idx]

    return {"positions": positions, "down": rows(mean.argsort()[:k]), "up": rows(mean.argsort(descending=True)[:k])}


def final_norm(model: Any) -> "torch.nn.Module | None":
    """The norm applied before the unembedding (Llama ``model.norm``, GPT-2 ``ln_f``, NeoX ``final_layer_norm``)."""
    hf = sites_mod._hf_module(model)
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm"):
        obj = hf
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.Module):
            return obj
    return None


@torch.no_grad()
def decoder_unembed(model: Any, dictionary: Dictionary, feature: int, k: int = 10) -> dict[str, list]:
    """Top and bottom ``k`` tokens of W_U · (N(f_i) − N(0)), N the final norm (identity where there is none)."""
    hf = sites_mod._hf_module(model)
    w_u = hf.get_output_embeddings().weight  # [vocab, d]
    f = dictionary.directions[feature].to(w_u.device, w_u.dtype)
    norm = final_norm(model)
    if norm is not None:
        f = norm(f) - norm(torch.zeros_like(f))
    logits = (w_u @ f).float().cpu()
    tok = model.tokenizer

    def rows(idx: torch.Tensor) -> list:
        return [[tok.decode([int(i)]), float(logits[i])] for i in idx]

    return {"top": rows(logits.argsort(descending=True)[:k]), "bottom": rows(logits.argsort()[:k])}


# -- the report --------------------------------------------------------------------
@dataclass
class FeatureReport:
    """Everything :func:`analyse_feature` finds about one feature."""

    site: str
    feature: int
    density: float  # fraction of stored rows where c_i > 0
    max_activation: float
    rows: int
    top: list[Context]
    random: list[Context]
    histogram: dict[str, Any]
    logit_effect: dict[str, Any]
    unembed: dict[str, list]
    paths: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for the terminal."""

        def toks(rows: list) -> str:
            return " ".join(repr(t) for t, _ in rows[:6])

        lines = [
            f"{self.site}:{self.feature}  density {self.density:.2e} over {self.rows} rows, max {self.max_activation:.3g}",
            "top contexts:",
            *(f"  {c.activation:8.3g}  {c.marked()}" for c in self.top[:5]),
            f"ablation lowers: {toks(self.logit_effect['down'])}",
            f"ablation raises: {toks(self.logit_effect['up'])}",
            f"decoder direction unembeds to: {toks(self.unembed['top'])}",
        ]
        return "\n".join(lines)

    def write_json(self, path: "str | Path") -> Path:
        """Write the report as JSON (the PNGs: :func:`circuitsae.viz.plots.write_feature_report`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(asdict(self), indent=1).encode())
        return path


def analyse_feature(
    model: Any,
    dictionary: Dictionary,
    store: ActivationStore,
    feature: int,
    site: "str | None" = None,
    *,
    k: int = 10,
    split: str = "train",
    seed: int = 0,
    progress: bool = True,
) -> FeatureReport:
    """Input and output side of ``feature`` (site: the dictionary's own by default); the logit effect
    is measured on the top and random contexts."""
    site = site or dictionary.meta.get("site")
    if site is None:
        raise CircuitSAEError("the dictionary does not record its site: pass site=")
    check_dictionary(model, site, dictionary)
    acts = feature_activations(dictionary, store, site, feature, split, progress)
    tokenizer = model.tokenizer
    top = top_contexts(acts, store, tokenizer, k, split)
    rand = random_contexts(acts, store, tokenizer, k, split, seed)
    ids = store.tokens(split)[sorted({c.context for c in top + rand})]
    return FeatureReport(
        site=site,
        feature=feature,
        density=float((acts > 0).float().mean()),
        max_activation=float(acts.max()),
        rows=len(acts),
        top=top,
        random=rand,
        histogram=token_histogram(acts, row_tokens(store, split), tokenizer),
        logit_effect=logit_effect(model, dictionary, site, ids, feature, k),
        unembed=decoder_unembed(model, dictionary, feature, k),
    )


# -- command line ------------------------------------------------------------------
