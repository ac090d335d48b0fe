"""Causal trees of dictionary features by ablation (REFERENCE §5, Cunningham et al. §5.3).

Given dictionaries at successive sites ``s_0 < s_1 < … < s_L`` of one model and
a target feature t at ``s_L``:

1. M = max of c_t over the store; take ``contexts`` contexts where c_t at some
   position p is in [M/2, M] (the best such position per context, contexts
   sampled with ``seed``), each truncated right after p.
2. The candidates at the previous site ``s_{L-1}`` are its features with
   c_i > 0 at some position ≤ p of some context. For each candidate i the
   less-than-rank-one ablation ``x ← x − c_i f_i`` (where c_i > 0) is applied
   at ``s_{L-1}`` and the model is rerun to ``s_L``:

       effect(i → t) = mean over contexts of  q_t(clean) − q_t(i ablated)

   with q_t = c_t at p. Candidates are ranked by effect; the top
   ``branching`` with a positive effect become t's parents.
3. Recurse from each parent into the site before it, to ``depth`` levels.
   **choice** — a parent is studied on the *same* contexts (truncated at the
   same p), and its quantity q_i is its activation summed over positions ≤ p
   (the positions where ablating it changed the site, so the mass that
   carried its effect on the child), not only at p: a parent that acts on the
   child through attention from earlier tokens fires there, not at p.

Edges point parent → child and carry ``effect`` (the mean decrease above) and
``relative`` (effect / the child's mean clean q). **Speed**: the model runs
once to record every site on the truncated contexts; each ablation then runs
only the blocks between the two sites (:class:`_Segment`: Hugging Face's own
blocks, :class:`~circuitsae.downstream.Blocks`, for ``resid`` sites of the
families that allow it, else the full model with forward hooks, stopped at the
later site); a candidate is run only on
the contexts where it fires, rows are batched per context under a token
budget, and all parents at one site are measured from the same ablation runs.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
from tqdm.auto import tqdm

from circuitsae import sites as sites_mod
from circuitsae.config import model_dtype_option, option
from circuitsae.dictionaries import Dictionary
from circuitsae.downstream import Blocks, tolerance
from circuitsae.errors import CircuitSAEError
from circuitsae.features import feature_activations, row_tokens, site_codes, site_hook
from circuitsae.models import input_device, model_name
from circuitsae.splice import check_dictionary, default_start
from circuitsae.store import ActivationStore


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the last needed site is recorded."""


def record(hf: Any, input_ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Activations ``[n, T, d]`` at ``names`` (forward order) in one pass that stops after the last."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(_m: Any, _i: Any, out: Any, name: str = name) -> None:
            got[name] = (out[0] if isinstance(out, tuple) else out).detach()
            if name == names[-1]:
                raise _Stop

        handles.append(sites_mod.module(hf, name).register_forward_hook(hook))
    try:
        hf(input_ids=input_ids)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


class _Segment:
    """Maps rows x ``[R, L, d]`` at site ``src`` (one context, ids ``[L]``) to the activation at ``dst``."""

    def __init__(self, model: Any, src: str, dst: str) -> None:
        self.model, self.hf, self.src, self.dst = model, sites_mod._hf_module(model), src, dst
        self.fast = Blocks.supports(model, src) and Blocks.supports(model, dst)
        a, b = sites_mod.Site.parse(src).layer, sites_mod.Site.parse(dst).layer
        self.blocks = Blocks(model, a + 1, b) if self.fast else None

    @property
    def engine(self) -> str:
        return "downstream" if self.fast else "hook"

    def __call__(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.blocks is None:
            return self._hooked(x, ids)
        r, t, _ = x.shape
        pos = torch.arange(t, device=x.device).expand(r, t)
        return self.blocks.run(x, pos, t)

    def _hooked(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        with site_hook(self.model, self.src, lambda out: x.to(out.dtype)):
            return record(self.hf, ids[None].expand(len(x), -1), [self.dst])[self.dst]

    def check(self, xs: torch.Tensor, ys: torch.Tensor, ids: torch.Tensor, lengths: list[int]) -> None:
        """Fall back to hooks (with a warning) if the block path does not reproduce the recorded ``ys``."""
        if not self.fast:
            return
        for n, length in enumerate(lengths):
            got, want = self(xs[n : n + 1, :length], ids[n, :length])[0], ys[n, :length]
            tol = tolerance(want.dtype) * float(want.abs().max()) + 1e-4
            if not torch.allclose(got.to(want.dtype), want, atol=tol, rtol=0):
                err = float((got - want).abs().max())
                warnings.warn(
                    f"block-only run {self.src} -> {self.dst} off by {err:.2e}; using full passes", stacklevel=3
                )
                self.fast, self.blocks = False, None
                return


def _check(model: Any, dictionaries: Mapping[str, Dictionary], target: tuple[str, int]) -> list[str]:
    """Validate the input; return the sites in forward order, ending at the target's."""
    names = [str(sites_mod.Site.parse(s)) for s in dictionaries]
    if not names:
        raise CircuitSAEError("no dictionaries given")
    models = {d.meta.get("model") for d in dictionaries.values()} - {None}
    if len(models) > 1:
        raise CircuitSAEError(f"the dictionaries come from different models: {', '.join(sorted(models))}")
    order = [str(s) for s in sites_mod.resolve(model, names)]
    if order != names:
        raise CircuitSAEError(
            f"dictionaries must be given in forward order ({', '.join(order)}), not {', '.join(names)}"
        )
    for s, d in zip(names, dictionaries.values()):
        check_dictionary(model, s, d)  # also moves each to its site's device
    site, feature = str(sites_mod.Site.parse(target[0])), int(target[1])
    if site not in names:
        raise CircuitSAEError(f"no dictionary at the target's site {site}: dictionaries are at {', '.join(names)}")
    if names.index(site) == 0:
        raise CircuitSAEError(f"no dictionary upstream of {site}: give one at an earlier site too")
    if not 0 <= feature < dictionaries[site].d_dict:
        raise CircuitSAEError(f"feature {feature} does not exist at {site} (0..{dictionaries[site].d_dict - 1})")
    return names[: names.index(site) + 1]


def _pick_contexts(acts: torch.Tensor, store: ActivationStore, n: int, split: str, seed: int) -> tuple[list, int]:
    """``(context, position)`` of up to ``n`` contexts whose best activation is in [M/2, M], and how many exist."""
    per = int(store.meta["rows_per_context"])
    best = acts.view(-1, per).max(-1)
    ok = (best.values >= acts.max() / 2).nonzero().flatten()
    chosen = ok[torch.randperm(len(ok), generator=torch.Generator().manual_seed(seed), device="cpu")[:n]].sort().values
    return [store.locate(int(c) * per + int(best.indices[c]), split) for c in chosen], len(ok)


@torch.no_grad()
def causal_tree(
    model: Any,
    dictionaries: Mapping[str, Dictionary],
    target: tuple[str, int],
    depth: int = 3,
    branching: int = 3,
    contexts: int = 20,
    store: "ActivationStore | str | None" = None,
    seed: int = 0,
    *,
    split: str = "train",
    token_budget: int = 8192,
    label_rows: int = 200_000,
    progress: bool = True,
) -> nx.DiGraph:
    """The ablation tree of ``target = (site, feature)``; see the module docstring for the definition.

    ``dictionaries`` maps sites (forward order) to dictionaries; ``store``
    defaults to the target dictionary's training store. Node ids are
    ``"site:feature"``; nodes carry ``site, layer, feature, label`` (the most
    frequent tokens among its top store activations), ``max_activation`` (over
    the first ``label_rows`` stored rows) and ``mean_activation`` (its q over
    the contexts).
    """
    t0 = time.perf_counter()
    chain = _check(model, dictionaries, target)
    if depth < 1 or branching < 1 or contexts < 1:
        raise CircuitSAEError("depth, branching and contexts must be >= 1")
    hf = sites_mod._hf_module(model)
    dicts = {s: dictionaries[s] for s in chain}
    site, feature = chain[-1], int(target[1])
    store = store if store is not None else dicts[site].meta.get("store")
    if store is None:
        raise CircuitSAEError("the target dictionary does not name its activation store: pass store=")
    store = ActivationStore(store) if not isinstance(store, ActivationStore) else store
    acts = feature_activations(dicts[site], store, site, feature, split, progress)
    big = float(acts.max())
    picked, available = _pick_contexts(acts, store, contexts, split, seed)
    if len(picked) < contexts:
        warnings.warn(
            f"only {len(picked)} contexts have {site}:{feature} in [M/2, M] = [{big / 2:.3g}, {big:.3g}]; "
            f"using them (asked for {contexts})",
            stacklevel=2,
        )
    tokens = store.tokens(split)
    pos = [p for _, p in picked]
    ids = torch.zeros(len(picked), max(pos) + 1, dtype=torch.long, device="cpu")
    for n, (c, p) in enumerate(picked):  # right padding: causal attention keeps positions <= p exact
        ids[n, : p + 1] = tokens[c, : p + 1]
    ids = ids.to(input_device(model))
    chain = chain[max(0, len(chain) - 1 - depth) :]
    xs = record(hf, ids, chain)
    codes = {}
    for s in chain:  # c > 0 only, at positions the dictionary applies to and <= p
        dev = xs[s].device
        valid = torch.arange(ids.shape[1], device=dev)[None] <= torch.tensor(pos, device=dev)[:, None]
        c = dicts[s].encode(xs[s].to(dicts[s].W_dec.dtype)).clamp_min(0) * valid[..., None]
        c[:, : default_start(dicts[s])] = 0
        codes[s] = c
    dev = codes[site].device
    at_p = torch.arange(len(pos), device=dev), torch.tensor(pos, device=dev)

    graph = nx.DiGraph()
    q_root = codes[site][at_p][:, feature]
    graph.add_node(f"{site}:{feature}", site=site, feature=feature, mean_activation=float(q_root.mean()))
    frontier, engines = [feature], {}
    for level in range(1, len(chain)):
        src, dst = chain[-1 - level], chain[-level]
        seg = _Segment(model, src, dst)
        seg.check(xs[src], xs[dst], ids, [p + 1 for p in pos])
        engines[f"{src}->{dst}"] = seg.engine
        effects, cands = _ablate_all(
            seg, dicts, src, dst, frontier, xs, codes, ids, pos, level == 1, token_budget, progress
        )
        parents = set()
        for j, child in enumerate(frontier):
            child_id = f"{dst}:{child}"
            mean = graph.nodes[child_id]["mean_activation"]
            order = effects[:, j].argsort(descending=True)[:branching]
            for k in order.tolist():
                if effects[k, j] <= 0:
                    break
                i = int(cands[k])
                node = f"{src}:{i}"
                if node not in graph:
                    q = codes[src][..., i].sum(-1)
                    graph.add_node(node, site=src, feature=i, mean_activation=float(q.mean()))
                eff = float(effects[k, j])
                graph.add_edge(node, child_id, effect=eff, relative=eff / mean if mean > 0 else None)
                parents.add(i)
        frontier = sorted(parents)
        if not frontier:
            break
    _label(graph, dicts, store, split, label_rows, model.tokenizer, progress)
    graph.graph.update(
        target=f"{site}:{feature}",
        model=model_name(model),
        target_max_activation=big,
        contexts=len(picked),
        contexts_requested=contexts,
        contexts_in_range=available,
        depth=depth,
        branching=branching,
        sites=chain,
        engines=engines,
        seconds=time.perf_counter() - t0,
    )
    return graph


def _ablate_all(
    seg: _Segment,
    dicts: Mapping[str, Dictionary],
    src: str,
    dst: str,
    frontier: list[int],
    xs: dict,
    codes: dict,
    ids: torch.Tensor,
    pos: list[int],
    root: bool,
    token_budget: int,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean decrease ``[candidates, len(frontier)]`` of each frontier feature at ``dst`` per ablated candidate at ``src``.

    A candidate is run only on the contexts where it fires (elsewhere its ablation changes nothing).
    """
    c_src, d_dst, f_src = codes[src], dicts[dst], dicts[src].directions
    fires = c_src.gt(0).any(1)  # [N, K]
    cands = fires.any(0).nonzero().flatten()
    dev = codes[dst].device  # effects are measured where the child's codes are
    total = torch.zeros(dicts[src].d_dict, len(frontier), device=dev)
    feats = torch.tensor(frontier, device=dev)
    start = default_start(d_dst)
    for n in tqdm(range(len(pos)), desc=f"ablating {src} -> {dst}", unit="context", disable=not progress, leave=False):
        length = pos[n] + 1
        clean = codes[dst][n, pos[n], feats] if root else codes[dst][n, :, feats].sum(0)
        ks = fires[n].nonzero().flatten()
        for b in range(0, len(ks), max(1, token_budget // length)):
            k = ks[b : b + max(1, token_budget // length)]
            delta = c_src[n, :length, k].T[..., None] * f_src[k][:, None, :]  # [R, L, d]
            x = xs[src][n, :length][None] - delta.to(xs[src].dtype)
            y = seg(x, ids[n, :length])
            y = y[:, pos[n]] if root else y[:, start:length]
            c = d_dst.encode_features(y.to(d_dst.W_dec.dtype), feats).clamp_min(0)
            total[k.to(dev)] += clean - (c if root else c.sum(1))
    return total[cands] / len(pos), cands


def _label(
    graph: nx.DiGraph, dicts: Mapping, store: ActivationStore, split: str, rows: int, tokenizer: Any, progress: bool
) -> None:
    """Set each node's ``max_activation`` and ``label`` (top tokens among its activations ≥ half its max)."""
    toks = row_tokens(store, split)
    by_site: dict[str, list[str]] = {}
    for node, a in graph.nodes(data=True):
        by_site.setdefault(a["site"], []).append(node)
    for s, nodes in by_site.items():
        feats = [graph.nodes[v]["feature"] for v in nodes]
        if s not in store.sites:
            for v in nodes:
                graph.nodes[v].update(label="", max_activation=None, layer=sites_mod.Site.parse(s).layer)
            continue
        c = site_codes(dicts[s], store, s, feats, split, rows, progress)
        for j, v in enumerate(nodes):
            a = c[:, j]
            top = toks[: len(a)][a >= a.max() / 2] if a.max() > 0 else toks[:0]
            common = torch.bincount(top).argsort(descending=True)[:3] if len(top) else []
            label = " ".join(repr(tokenizer.decode([int(t)])) for t in common if (top == t).any())
            graph.nodes[v].update(label=label, max_activation=float(a.max()), layer=sites_mod.Site.parse(s).layer)


@dataclass
class TreeConfig:
    """``circuitsae tree SITE:ID``: the causal tree of a feature, drawn."""

    target: str = option("", "SITE:FEATURE, e.g. resid.5:123", cli=False)
    dictionaries: tuple[str, ...] = option((), "dictionary folders or a training output folder (one per site)")
    arch: "str | None" = option(None, "keep only dictionaries of this architecture (relu, gated, ...)")
    coefficient: "float | None" = option(None, "keep only dictionaries trained with this sparsity coefficient")
    depth: int = option(3, "levels of parents to search (sites upstream of the target)")
    branching: int = option(3, "parents kept per node")
    contexts: int = option(20, "contexts where the target is in [M/2, M]")
    store: "str | None" = option(None, "activation store (default: the one the target dictionary was trained on)")
    model: "str | None" = option(None, "model (default: the one the dictionaries were trained on)")
    seed: int = option(0, "seed of the context sample")
    max_nodes: int = option(40, "draw at most this many nodes (the strongest)")
    out: str = option("runs/tree/causal_tree", "output path stem: writes .dot, .svg, .png and .json")
    device: "str | None" = option(None, "cpu, cuda, ... (default: cuda if available)")
    model_dtype: "str | None" = model_dtype_option()

    def __post_init__(self) -> None:
        self.dictionaries = tuple(self.dictionaries)
        if min(self.depth, self.branching, self.contexts, self.max_nodes) < 1:
            raise CircuitSAEError("depth, branching, contexts and max_nodes must be >= 1")
        if not self.dictionaries:
            raise CircuitSAEError("name the dictionaries with --dictionaries")


def run_tree(cfg: TreeConfig, model: Any = None, progress: bool = True) -> tuple[nx.DiGraph, dict[str, str]]:
    """Load what ``cfg`` names, build the tree and render it; return the graph and the written paths."""
    from circuitsae.features import parse_target, select_dictionaries
    from circuitsae.models import load_model
    from circuitsae.render import render

    target = parse_target(cfg.target)
    dicts = select_dictionaries(cfg.dictionaries, cfg.arch, cfg.coefficient)
    if target[0] not in dicts:
        raise CircuitSAEError(f"no dictionary at {target[0]}: the dictionaries given are at {', '.join(dicts)}")
    models = {d.meta.get("model") for d in dicts.values()} - {None}
    name = cfg.model or (min(models) if models else "smollm2-135m")
    model = model or load_model(name, device=cfg.device, dtype=cfg.model_dtype)
    graph = causal_tree(
        model, dicts, target, cfg.depth, cfg.branching, cfg.contexts, cfg.store, cfg.seed, progress=progress
    )
    return graph, render(graph, cfg.out, max_nodes=cfg.max_nodes)
