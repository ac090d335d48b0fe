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
3. Recurse, to ``depth`` levels. Two ways (``mode``):

   * ``"paper"`` (the default, as Cunningham et al. §5.3 "recursively apply"
     the procedure): every kept parent p is a target in its own right — its
     own maximum M_p over the store, its own fresh contexts where it is in
     [M_p/2, M_p], truncated at its own best position, and q = its activation
     there. A feature that is the parent of several children is studied once.
     Every site of the tree must be in the store.
   * ``"shared"`` (a **choice**, not the paper's quantity): every level reuses
     the root's contexts (truncated at the root's p), and a parent's q is its
     activation summed over positions ≤ p — the positions where ablating it
     changed the site, so the mass that carried its effect on the child.

Edges point parent → child and carry ``effect`` (the mean decrease above) and
``relative`` (effect / the child's mean clean q). The result is a :class:`CausalTree`: the graph, the
run's settings as typed fields, :meth:`~CausalTree.prune` and node-link JSON; drawing is in
:mod:`circuitsae.viz.render`.

**One computation path.** The clean q of the child is computed in the same
batch, by the same code, as the ablated ones (the clean context is row 0 of
every batch of ablations), so an ablation that changes nothing has an effect
of exactly 0, and no numerical gap between two paths biases the edges.

**Speed.** The model runs once per set of contexts to record the sites; each
ablation then runs only the blocks between the two sites (:class:`_Segment`:
Hugging Face's own blocks, :class:`~circuitsae.interventions.replay.Blocks`, for
``resid`` sites of the families that allow it, else the full model with
forward hooks, stopped at the later site). On the block path a candidate is
recomputed only from the first position where it fires (the clean context's
keys and values serve the positions before; windows are rounded up to a power
of two so candidates batch together), only on the contexts where it fires, and
all candidates of a context are batched under a token budget.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import networkx as nx
import torch
from tqdm.auto import tqdm

from circuitsae import sites as sites_mod
from circuitsae.circuits.features import feature_activations, row_tokens, site_codes, site_hook
from circuitsae.data.store import ActivationStore, recorded_store
from circuitsae.dictionaries import Dictionary
from circuitsae.errors import CircuitSAEError
from circuitsae.interventions.replay import Blocks, KeyValueWindow, tolerance
from circuitsae.interventions.splice import check_dictionary, default_start
from circuitsae.models import input_device, model_name


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
    """Maps rows x ``[R, Q, d]`` at site ``src`` to the activation at ``dst``, for one context at a time.

    :meth:`prepare` records the clean context (ids ``[L]``, activation ``[L, d]`` at ``src``); rows then
    cover positions ``start .. L-1`` of that context. On the block path the clean context's keys and values
    serve the positions before ``start``; the hook path runs whole contexts (``start`` must be 0).
    """

    def __init__(self, model: Any, src: str, dst: str) -> None:
        self.model, self.hf, self.src, self.dst = model, sites_mod._hf_module(model), src, dst
        self.fast = Blocks.supports(model, src) and Blocks.supports(model, dst)
        a, b = sites_mod.Site.parse(src).layer, sites_mod.Site.parse(dst).layer
        self.blocks = Blocks(model, a + 1, b) if self.fast else None
        self.at_p = _AtP.make(model, src, dst) if self.fast else None  # the child's q at p needs only this
        self.kv = KeyValueWindow()
        self.ids: "torch.Tensor | None" = None

    @property
    def engine(self) -> str:
        return ("downstream+at_p" if self.at_p is not None else "downstream") if self.fast else "hook"

    def prepare(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        """Record the clean context: its keys and values at every block (block path), its ids (hook path)."""
        self.ids = ids
        if self.blocks is not None:
            t = x.shape[0]
            self.kv.replay, self.kv.record = None, True
            self.blocks.run(x[None], torch.arange(t, device=x.device)[None], t, self.kv)

    def __call__(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        if self.blocks is None:
            assert start == 0, "the hook path runs whole contexts"
            with site_hook(self.model, self.src, lambda out: x.to(out.dtype)):
                return record(self.hf, self.ids[None].expand(len(x), -1), [self.dst])[self.dst]
        r, q, _ = x.shape
        pos = (start + torch.arange(q, device=x.device)).expand(r, q)
        self.kv.replay = (torch.zeros(r, dtype=torch.long, device="cpu"), pos)
        try:
            return self.blocks.run(x, pos, start + q, self.kv)
        finally:
            self.kv.replay = None

    def check(self, xs: torch.Tensor, ys: torch.Tensor, ids: torch.Tensor, lengths: list[int]) -> None:
        """Fall back to hooks (with a warning) if the block path does not reproduce the recorded ``ys``.

        Checks the whole context and, from half way, the replayed window of each context.
        """
        if not self.fast:
            return
        for n, length in enumerate(lengths):
            self.prepare(xs[n, :length], ids[n, :length])
            half = length // 2
            want = ys[n, :length]
            got = torch.cat([self(xs[n : n + 1, :length])[0, :half], self(xs[n : n + 1, half:length], half)[0]])
            tol = tolerance(want.dtype) * float(want.abs().max()) + 1e-4
            if not torch.allclose(got.to(want.dtype), want, atol=tol, rtol=0):
                err = float((got - want).abs().max())
                warnings.warn(
                    f"block-only run {self.src} -> {self.dst} off by {err:.2e}; using full passes", stacklevel=3
                )
                self.fast, self.blocks, self.at_p = False, None, None
                return
            if self.at_p is not None:  # the last position alone, clean and with one real edit
                self.at_p.prepare(xs[n, :length])
                codes = torch.zeros(length, 1, dtype=xs.dtype, device=xs.device)
                codes[length // 2 :, 0] = 1.0
                edit = xs[n, :length].std(0, keepdim=True)
                window = self(xs[n : n + 1, :length] - codes.T[..., None] * edit)[0, -1]
                got = self.at_p(codes, edit)
                want_p = torch.stack([want[-1], window.to(want.dtype)])
                if not torch.allclose(got.to(want.dtype), want_p, atol=tol, rtol=0):
                    err = float((got - want_p).abs().max())
                    warnings.warn(
                        f"last-position run {self.src} -> {self.dst} off by {err:.2e}; using the block path",
                        stacklevel=3,
                    )
                    self.at_p = None


class _AtP:
    """One Llama-style decoder block computed at the context's last position only, for many ablations at once.

    What the child's q at p needs from the block after ``src``: the keys and values of every position (those
    an ablation changes recomputed, the others the clean context's), the query, attention, output projection
    and MLP at p alone. Costs O(changed positions) projections + one position's block per ablation, instead
    of the block over a window. For families whose layer is ``input_layernorm → self_attn → +x →
    post_attention_layernorm → mlp → +h`` with rotary half-rotation (Llama/SmolLM2, Qwen2, Mistral); None
    elsewhere (:meth:`make`), and checked against the block path before use (:meth:`check`).
    """

    FAMILIES = ("llama", "qwen2", "mistral")

    @classmethod
    def make(cls, model: Any, src: str, dst: str) -> "_AtP | None":
        hf = sites_mod._hf_module(model)
        a, b = sites_mod.Site.parse(src), sites_mod.Site.parse(dst)
        if getattr(hf.config, "model_type", None) not in cls.FAMILIES or not Blocks.supports(model, src):
            return None
        if not Blocks.supports(model, dst) or b.layer != a.layer + 1:
            return None
        return cls(hf, b.layer)

    def __init__(self, hf: Any, layer: int) -> None:
        cfg, inner = hf.config, hf.model
        blk = inner.layers[layer]
        self.ln1, self.attn, self.ln2, self.mlp = (
            blk.input_layernorm,
            blk.self_attn,
            blk.post_attention_layernorm,
            blk.mlp,
        )
        self.rotary = inner.rotary_emb
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scaling = getattr(self.attn, "scaling", self.hd**-0.5)
        types = getattr(cfg, "layer_types", None)
        sliding = (types[layer] == "sliding_attention") if types else cfg.model_type == "mistral"
        self.window = getattr(cfg, "sliding_window", None) if sliding else None

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding as these families apply it (transformers' own ``rotate_half``)."""
        from transformers.models.llama.modeling_llama import rotate_half

        return x * cos + rotate_half(x) * sin

    def prepare(self, x: torch.Tensor) -> None:
        """Record the clean context ``x`` ``[L, d]`` (the block's input): its keys and values, rotated."""
        length = x.shape[0]
        cos, sin = self.rotary(x[None], torch.arange(length, device=x.device)[None])
        self.cos, self.sin = cos[0][:, None], sin[0][:, None]  # [L, 1, hd]
        self.k, self.v = self._kv(x, torch.arange(length, device=x.device))
        self.x = x

    def _kv(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.ln1(x)
        k = self.attn.k_proj(n).view(-1, self.kv_heads, self.hd)
        v = self.attn.v_proj(n).view(-1, self.kv_heads, self.hd)
        return self._rope(k, self.cos[pos], self.sin[pos]), v

    def __call__(self, codes: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """The block's output at the last position ``[R + 1, d]``: row 0 clean, row r+1 with ablation r.

        ``codes`` ``[L, R]`` (c of each ablated feature per position, 0 where it is off) and ``directions``
        ``[R, d]``; the ablation is x ← x − c f at the positions where that edit is non-zero.
        """
        x, length = self.x, self.x.shape[0]
        r = codes.shape[1]
        delta = codes.T[..., None].to(x.dtype) * directions.to(x.dtype)[:, None, :]  # [R, L, d]
        changed = (delta != 0).any(-1)  # [R, L]
        rows, pos = changed.nonzero(as_tuple=True)
        k = self.k[None].repeat(r + 1, 1, 1, 1)  # [R+1, L, kvh, hd]
        v = self.v[None].repeat(r + 1, 1, 1, 1)
        if len(rows):
            kc, vc = self._kv(x[pos] - delta[rows, pos], pos)
            k[rows + 1, pos], v[rows + 1, pos] = kc, vc
        xp = torch.cat([x[-1:], x[-1:] - delta[:, -1]])  # [R+1, d]
        last = torch.full((1,), length - 1, device=x.device)
        q = self.attn.q_proj(self.ln1(xp)).view(r + 1, self.kv_heads, self.heads // self.kv_heads, self.hd)
        q = self._rope(q, self.cos[last], self.sin[last])
        scores = torch.einsum("rkgh,rlkh->rkgl", q, k) * self.scaling
        if self.window is not None and length > self.window:
            scores[..., : length - self.window] = torch.finfo(scores.dtype).min
        w = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.einsum("rkgl,rlkh->rkgh", w, v).reshape(r + 1, self.heads * self.hd)
        h = xp + self.attn.o_proj(out)
        return h + self.mlp(self.ln2(h))


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


@dataclass
class _Contexts:
    """Contexts truncated right after a position p each, with the sites recorded on them and their codes."""

    ids: torch.Tensor  # [N, T] right-padded (causal attention keeps positions <= p exact)
    pos: list[int]  # p per context
    xs: dict[str, torch.Tensor]  # site -> [N, T, d]
    codes: dict[str, torch.Tensor]  # site -> [N, T, K], c > 0 only, at positions start..p

    @property
    def lengths(self) -> list[int]:
        return [p + 1 for p in self.pos]

    def at_p(self, site: str) -> torch.Tensor:
        """[N, K]: the codes at each context's p."""
        c = self.codes[site]
        return c[torch.arange(len(self.pos), device=c.device), torch.tensor(self.pos, device=c.device)]


def _contexts(model: Any, hf: Any, dicts: Mapping, store: ActivationStore, picked: list, split: str, sites: list):
    tokens = store.tokens(split)
    pos = [p for _, p in picked]
    ids = torch.zeros(len(picked), max(pos) + 1, dtype=torch.long, device="cpu")
    for n, (c, p) in enumerate(picked):
        ids[n, : p + 1] = tokens[c, : p + 1]
    ids = ids.to(input_device(model))
    xs = record(hf, ids, sites)
    codes = {}
    for s in sites:  # c > 0 only, at positions the dictionary applies to and <= p
        dev = xs[s].device
        valid = torch.arange(ids.shape[1], device=dev)[None] <= torch.tensor(pos, device=dev)[:, None]
        c = dicts[s].encode(xs[s].to(dicts[s].W_dec.dtype)).clamp_min(0) * valid[..., None]
        c[:, : default_start(dicts[s])] = 0
        codes[s] = c
    return _Contexts(ids, pos, xs, codes)


@dataclass
class CausalTree:
    """The ablation tree of one feature (:func:`causal_tree`): a graph and what it was built from.

    ``graph`` is a ``networkx.DiGraph`` whose node ids are ``"site:feature"``. Every node carries

    * ``site`` (str), ``layer`` (int) and ``feature`` (int);
    * ``label`` (str): the most frequent tokens among its top store activations ("" when its site is not in
      the store);
    * ``max_activation`` (float | None): its largest code over the first ``label_rows`` stored rows;
    * ``mean_activation`` (float | None): its clean q over the contexts it was studied on;
    * in paper mode also ``contexts`` (int) and ``context_max`` (float, the M its contexts were sampled below).

    Edges point parent → child and carry ``effect`` (float: mean decrease of the child's q when the parent is
    ablated, an exact ablation, not an estimate) and ``relative`` (float | None: effect / the child's mean
    clean q). The other fields describe the run; each is None only for a tree read from a graph made
    elsewhere (:meth:`from_graph`). :meth:`to_json` is networkx node-link data with these fields as its
    ``graph`` attributes, so other tools read it as a plain graph.
    """

    graph: nx.DiGraph
    target: "str | None" = None
    """The root, ``"site:feature"``."""
    model: "str | None" = None
    """The model's name."""
    mode: "str | None" = None
    """``"paper"`` (each parent on its own contexts) or ``"shared"`` (the root's contexts throughout)."""
    target_max_activation: "float | None" = None
    """M of the target: its largest code over the store's split; contexts have it in [M/2, M]."""
    contexts: "int | None" = None
    """Contexts the target was studied on."""
    contexts_requested: "int | None" = None
    """Contexts asked for."""
    contexts_in_range: "int | None" = None
    """Contexts of the store with the target in [M/2, M]."""
    depth: "int | None" = None
    """Levels of parents asked for."""
    branching: "int | None" = None
    """Parents kept per node."""
    sites: "list[str] | None" = None
    """The sites of the tree, forward order, ending at the target's."""
    engines: "dict[str, str] | None" = None
    """How each segment ``"src->dst"`` was run: ``downstream+at_p``, ``downstream`` or ``hook``."""
    seconds: "float | None" = None
    """Wall time of :func:`causal_tree`."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other graph attributes, kept as given (e.g. the machine a benchmark ran on); written after the others."""

    # reading the graph, as on a networkx graph
    @property
    def nodes(self) -> Any:
        """The graph's node view: ``tree.nodes[v]`` is node v's attributes."""
        return self.graph.nodes

    @property
    def edges(self) -> Any:
        """The graph's edge view: ``tree.edges(data=True)``, ``tree.edges[u, v]["effect"]``."""
        return self.graph.edges

    def number_of_nodes(self) -> int:
        return self.graph.number_of_nodes()

    def number_of_edges(self) -> int:
        return self.graph.number_of_edges()

    def __contains__(self, node: object) -> bool:
        return node in self.graph

    def _meta(self) -> dict[str, Any]:
        """The fields other than ``graph`` that are set, in order, then ``extra``."""
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("graph", "extra")}
        return {**{k: v for k, v in meta.items() if v is not None}, **self.extra}

    def prune(self, max_nodes: int = 40, min_effect: float = 0.0) -> "CausalTree":
        """The target plus at most ``max_nodes − 1`` nodes ranked by their strongest edge, still connected to it.

        Edges with an effect below ``min_effect`` go first; the same metadata, a smaller graph.
        """
        g = self.graph.copy()
        g.remove_edges_from([(u, v) for u, v, e in self.graph.edges(data=True) if e["effect"] < min_effect])
        strength = {v: max((e["effect"] for *_, e in g.out_edges(v, data=True)), default=0.0) for v in g}
        if self.target in strength:
            strength[self.target] = float("inf")
        keep = sorted(strength, key=strength.get, reverse=True)[:max_nodes]
        g = g.subgraph(keep).copy()
        if self.target in g:
            g = g.subgraph(nx.ancestors(g, self.target) | {self.target}).copy()
        return replace(self, graph=g, extra=dict(self.extra))

    def to_json(self) -> dict[str, Any]:
        """networkx node-link data (``edges`` key) with the fields as graph attributes; :meth:`from_json` reads it."""
        data = nx.node_link_data(self.graph, edges="edges")
        data["graph"] = self._meta()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "CausalTree":
        """The tree from :meth:`to_json`'s data (or node-link data written by older networkx, with ``links``)."""
        graph = nx.node_link_graph(dict(data), directed=True, edges="edges" if "edges" in data else "links")
        return cls.from_graph(graph)

    @classmethod
    def from_graph(cls, graph: nx.DiGraph) -> "CausalTree":
        """A tree of a graph with the fields as graph attributes (as :func:`causal_tree` once returned)."""
        g = graph.copy()
        attrs, g.graph = dict(g.graph), {}
        names = {f.name for f in fields(cls)} - {"graph", "extra"}
        known = {k: attrs.pop(k) for k in list(attrs) if k in names}
        return cls(graph=g, **known, extra=attrs)


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
    mode: str = "paper",
    split: str = "train",
    token_budget: int = 8192,
    label_rows: int = 200_000,
    progress: bool = True,
) -> CausalTree:
    """The ablation tree of ``target = (site, feature)``; see the module docstring for the definition.

    ``dictionaries`` maps sites (forward order) to dictionaries; ``store``
    defaults to the target dictionary's training store. ``mode`` is ``"paper"``
    (each parent studied on its own contexts) or ``"shared"`` (the root's
    contexts throughout). Returns a :class:`CausalTree` (its docstring lists the
    node and edge attributes); ``label_rows`` stored rows are read for each node's
    ``label`` and ``max_activation``.
    """
    t0 = time.perf_counter()
    chain = _check(model, dictionaries, target)
    if depth < 1 or branching < 1 or contexts < 1:
        raise CircuitSAEError("depth, branching and contexts must be >= 1")
    if mode not in ("paper", "shared"):
        raise CircuitSAEError(f"mode must be 'paper' (each parent on its own contexts) or 'shared', not {mode!r}")
    hf = sites_mod._hf_module(model)
    dicts = {s: dictionaries[s] for s in chain}
    site, feature = chain[-1], int(target[1])
    if store is None:
        store = recorded_store(dicts[site].meta, dicts[site].folder, f"the dictionary at {site}")
    store = ActivationStore(store) if not isinstance(store, ActivationStore) else store
    chain = chain[max(0, len(chain) - 1 - depth) :]
    if mode == "paper":
        missing = [s for s in chain[:-1] if s not in store.sites]
        if missing:
            raise CircuitSAEError(
                f"a paper-mode tree samples each parent's own contexts from the store, which lacks {', '.join(missing)}"
                "; harvest those sites too, or use mode='shared'"
            )
    acts = feature_activations(dicts[site], store, site, feature, split, progress)
    big = float(acts.max())
    picked, available = _pick_contexts(acts, store, contexts, split, seed)
    if len(picked) < contexts:
        warnings.warn(
            f"only {len(picked)} contexts have {site}:{feature} in [M/2, M] = [{big / 2:.3g}, {big:.3g}]; "
            f"using them (asked for {contexts})",
            stacklevel=2,
        )
    root = _contexts(model, hf, dicts, store, picked, split, chain if mode == "shared" else chain[-2:])
    graph = nx.DiGraph()
    q_root = root.at_p(site)[:, feature]
    graph.add_node(f"{site}:{feature}", site=site, feature=feature, mean_activation=float(q_root.mean()))
    if mode == "paper":
        graph.nodes[f"{site}:{feature}"].update(contexts=len(picked), context_max=big)
    frontier, engines = [feature], {}
    for level in range(1, len(chain)):
        src, dst = chain[-1 - level], chain[-level]
        seg = _Segment(model, src, dst)
        engines[f"{src}->{dst}"] = seg.engine
        if mode == "shared" or level == 1:
            seg.check(root.xs[src], root.xs[dst], root.ids, root.lengths)
            effects, cands = _effects(seg, dicts, src, dst, frontier, root, level == 1, token_budget, progress)
            studied = [(child, effects[:, j], cands) for j, child in enumerate(frontier)]
        else:
            studied = _study_each(model, hf, seg, dicts, store, split, src, dst, frontier, contexts, seed,
                                  token_budget, graph, progress)  # fmt: skip
        parents = set()
        for child, eff_child, cands in studied:
            child_id = f"{dst}:{child}"
            mean = graph.nodes[child_id]["mean_activation"]
            for k in eff_child.argsort(descending=True)[:branching].tolist():
                if eff_child[k] <= 0:
                    break
                i = int(cands[k])
                node = f"{src}:{i}"
                if node not in graph:
                    q = root.codes[src][..., i].sum(-1) if mode == "shared" else None
                    graph.add_node(
                        node, site=src, feature=i, mean_activation=float(q.mean()) if q is not None else None
                    )
                eff = float(eff_child[k])
                graph.add_edge(node, child_id, effect=eff, relative=eff / mean if mean and mean > 0 else None)
                parents.add(i)
        frontier = sorted(parents)
        if not frontier:
            break
    if mode == "paper":  # the last level's parents were never studied as targets: their q at their own p
        _fill_means(graph, dicts, store, split, contexts, seed, progress)
    _label(graph, dicts, store, split, label_rows, model.tokenizer, progress)
    return CausalTree(
        graph,
        target=f"{site}:{feature}",
        model=model_name(model),
        mode=mode,
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


def _own_contexts(
    dicts: Mapping,
    store: ActivationStore,
    split: str,
    site: str,
    features: list[int],
    n: int,
    seed: int,
    progress: bool,
) -> dict[int, tuple[list, float]]:
    """Each feature's own contexts (``_pick_contexts``) and its maximum M, from one pass over the store."""
    acts = site_codes(dicts[site], store, site, features, split, progress=progress)
    return {
        f: (_pick_contexts(acts[:, j], store, n, split, seed)[0], float(acts[:, j].max()))
        for j, f in enumerate(features)
    }


def _study_each(
    model: Any,
    hf: Any,
    seg: "_Segment",
    dicts: Mapping,
    store: ActivationStore,
    split: str,
    src: str,
    dst: str,
    frontier: list[int],
    contexts: int,
    seed: int,
    token_budget: int,
    graph: nx.DiGraph,
    progress: bool,
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Paper mode: each frontier feature at ``dst`` is a target of its own, on its own contexts."""
    own = _own_contexts(dicts, store, split, dst, frontier, contexts, seed, progress)
    out = []
    for child in frontier:
        picked, big = own[child]
        ctx = _contexts(model, hf, dicts, store, picked, split, [src, dst])
        q = ctx.at_p(dst)[:, child]
        graph.nodes[f"{dst}:{child}"].update(mean_activation=float(q.mean()), contexts=len(picked), context_max=big)
        seg.check(ctx.xs[src], ctx.xs[dst], ctx.ids, ctx.lengths)
        effects, cands = _effects(seg, dicts, src, dst, [child], ctx, True, token_budget, progress)
        out.append((child, effects[:, 0], cands))
    return out


def _fill_means(
    graph: nx.DiGraph, dicts: Mapping, store: ActivationStore, split: str, n: int, seed: int, progress: bool
) -> None:
    """Paper mode: the leaves were never studied as targets; their mean q at their own p over their own
    contexts, read off the stored activations (the studied nodes' q come from the model run)."""
    todo: dict[str, list[int]] = {}
    for _, a in graph.nodes(data=True):
        if a.get("mean_activation") is None:
            todo.setdefault(a["site"], []).append(a["feature"])
    per, first = int(store.meta["rows_per_context"]), int(store.meta["first_position"])
    for s, feats in todo.items():
        acts = site_codes(dicts[s], store, s, feats, split, progress=progress)
        for j, f in enumerate(feats):
            picked, _ = _pick_contexts(acts[:, j], store, n, split, seed)
            rows = [c * per + p - first for c, p in picked]
            graph.nodes[f"{s}:{f}"].update(
                mean_activation=float(acts[rows, j].mean()), contexts=len(picked), context_max=float(acts[:, j].max())
            )


@torch.no_grad()
def _effects(
    seg: _Segment,
    dicts: Mapping[str, Dictionary],
    src: str,
    dst: str,
    frontier: list[int],
    ctx: _Contexts,
    at_p: bool,
    token_budget: int,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean decrease ``[candidates, len(frontier)]`` of each frontier feature at ``dst`` per ablated candidate at ``src``.

    q is each frontier feature's code at p (``at_p``) or summed over the positions its dictionary applies to.
    Every batch holds the clean context as row 0, so clean and ablated q come from one computation.
    """
    c_src, d_dst, f_src = ctx.codes[src], dicts[dst], dicts[src].directions
    fires = c_src.gt(0).any(1)  # [N, K]
    cands = fires.any(0).nonzero().flatten()
    dev = ctx.codes[dst].device  # effects are measured where the child's codes are
    total = torch.zeros(dicts[src].d_dict, len(frontier), device=dev, dtype=torch.float64)
    feats = torch.tensor(frontier, device=dev)
    first_dst = default_start(d_dst)
    bar = tqdm(total=int(fires.sum()), desc=f"ablating {src} -> {dst}", unit="ablation", disable=not progress,
               leave=False)  # fmt: skip
    for n, length in enumerate(ctx.lengths):
        ks = fires[n].nonzero().flatten()
        if len(ks) == 0:
            continue
        x = ctx.xs[src][n, :length]
        if at_p and seg.at_p is not None:  # the block at the last position only
            seg.at_p.prepare(x)
            per = max(1, 4 * token_budget // length)
            for b in range(0, len(ks), per):
                k = ks[b : b + per]
                y = seg.at_p(c_src[n, :length, k], f_src[k])
                c = d_dst.encode_features(y.to(d_dst.W_dec.dtype), feats).clamp_min(0).double()
                total[k.to(dev)] += c[0] - c[1:]
                bar.update(len(k))
            continue
        seg.prepare(x, ctx.ids[n, :length])
        if seg.fast:  # recompute from the first position each candidate fires at (windows of 2^j positions)
            first = c_src[n, :length, ks].gt(0).float().argmax(0).cpu()
            width = (2 ** torch.ceil(torch.log2((length - first).float()))).long().clamp(max=length)
            starts = length - width
        else:
            starts = torch.zeros(len(ks), dtype=torch.long, device="cpu")
        for start in starts.unique().tolist():
            group = ks[(starts == start).to(ks.device)]
            per = max(1, token_budget // (length - start) - 1)
            for b in range(0, len(group), per):
                k = group[b : b + per]
                delta = c_src[n, start:length, k].T[..., None] * f_src[k][:, None, :]  # [R, Q, d]
                rows = torch.cat([x[None, start:], x[None, start:] - delta.to(x.dtype)])
                y = seg(rows, start)
                y = y[:, -1:] if at_p else y[:, max(0, first_dst - start) :]
                c = d_dst.encode_features(y.to(d_dst.W_dec.dtype), feats).clamp_min(0).sum(1).double()
                total[k.to(dev)] += c[0] - c[1:]
                bar.update(len(k))
    bar.close()
    return (total[cands] / len(ctx.lengths)).float(), cands


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
