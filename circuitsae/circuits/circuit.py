"""Whole-model feature circuits: the graph of the nodes and edges that carry a task (REFERENCE §8).

:func:`feature_circuit` estimates every node's effect (:mod:`~circuitsae.circuits.effects`), keeps the nodes
above a threshold (or the top n), estimates the edges among them, and returns a :class:`FeatureCircuit`: a
``networkx`` graph plus what it was built from. :meth:`FeatureCircuit.check` measures the exact effect of the
kept nodes, a stratified sample of the others and a sample of edges, and reports how far the estimates are
from them. :func:`faithfulness` ablates what a circuit leaves out (Marks et al. §3.2).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import networkx as nx
import torch

from circuitsae import sites as sites_mod
from circuitsae.circuits import effects as E
from circuitsae.dictionaries import Dictionary
from circuitsae.errors import CircuitSAEError
from circuitsae.interventions.splice import logits_of
from circuitsae.models import input_device, model_name
from circuitsae.tasks.pairs import PromptPairs

ABLATIONS = ("mean", "patch")


def node_id(node: E.Node) -> str:
    """The graph's id of a node: ``"resid.3/41"``, ``"attn.2/err"``, ``"logits"``."""
    return str(node)


def parse_node(text: str) -> E.Node:
    """The :class:`~circuitsae.circuits.effects.Node` of a graph id (inverse of :func:`node_id`)."""
    if text == "logits":
        return E.LOGITS
    site, _, what = text.partition("/")
    what, _, pos = what.partition("@")
    return E.Node(site, None if what == "err" else int(what), int(pos) if pos else None)


@dataclass
class FeatureCircuit:
    """A feature circuit: ``graph`` (``networkx.DiGraph``) and what it was built from.

    Node ids are :func:`node_id` strings. Every node carries ``site``, ``kind`` (resid/attn/mlp/logits),
    ``layer`` (int; the logits node one past the last block), ``feature`` (int, or None for an error node),
    ``error`` (bool), ``effect`` (the estimated indirect effect on the metric, summed over positions and
    averaged over prompts), ``label`` (top tokens, "" when none were given) and, once checked, ``exact``.
    Edges run upstream → downstream and carry ``effect`` (the estimate ê) and, once checked, ``exact``.
    """

    graph: nx.DiGraph
    model: "str | None" = None
    metric: "str | None" = None
    method: "str | None" = None
    steps: "int | None" = None
    sites: "list[str] | None" = None
    prompts: "int | None" = None
    node_threshold: "float | None" = None
    edge_threshold: "float | None" = None
    max_nodes: "int | None" = None
    base_metric: "float | None" = None
    seconds: "dict[str, float] | None" = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nodes(self) -> Any:
        return self.graph.nodes

    @property
    def edges(self) -> Any:
        return self.graph.edges

    def number_of_nodes(self) -> int:
        return self.graph.number_of_nodes()

    def number_of_edges(self) -> int:
        return self.graph.number_of_edges()

    def members(self) -> list[E.Node]:
        """The circuit's nodes (not the logits), as :class:`~circuitsae.circuits.effects.Node`."""
        return [parse_node(v) for v in self.graph if v != "logits"]

    def _meta(self) -> dict[str, Any]:
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("graph", "extra")}
        return {**{k: v for k, v in meta.items() if v is not None}, **self.extra}

    def prune(self, max_nodes: int = 60, min_edge: float = 0.0) -> "FeatureCircuit":
        """At most ``max_nodes`` nodes (largest |effect| first, the logits always kept) and the edges among them
        with |effect| ≥ ``min_edge``; nodes left with no edge to the rest are dropped (unless nothing would
        remain)."""
        if max_nodes < 1:
            raise CircuitSAEError(f"max_nodes must be >= 1, got {max_nodes}")
        g = self.graph
        ranked = sorted((v for v in g if v != "logits"), key=lambda v: -abs(g.nodes[v]["effect"]))
        keep = set(ranked[:max_nodes]) | ({"logits"} & set(g))
        sub = g.subgraph(keep).copy()
        sub.remove_edges_from([(u, v) for u, v, e in sub.edges(data=True) if abs(e["effect"]) < min_edge])
        linked = {v for v in sub if sub.degree(v) > 0}
        if linked:
            sub = sub.subgraph(linked | ({"logits"} & set(sub))).copy()
        return replace(self, graph=sub, extra=dict(self.extra))

    def to_json(self) -> dict[str, Any]:
        """networkx node-link data (``edges`` key) with the fields as graph attributes."""
        data = nx.node_link_data(self.graph, edges="edges")
        data["graph"] = self._meta()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FeatureCircuit":
        """The circuit of :meth:`to_json`'s data."""
        graph = nx.node_link_graph(dict(data), directed=True, edges="edges")
        attrs, graph.graph = dict(graph.graph), {}
        names = {f.name for f in fields(cls)} - {"graph", "extra"}
        known = {k: attrs.pop(k) for k in list(attrs) if k in names}
        return cls(graph=graph, **known, extra=attrs)


def _node_attrs(node: E.Node, effect: float, n_layers: int, label: str = "") -> dict[str, Any]:
    if node == E.LOGITS:
        return dict(site="logits", kind="logits", layer=n_layers, feature=None, error=False, effect=effect, label="")
    site = sites_mod.Site.parse(node.site)
    return dict(site=node.site, kind=site.kind, layer=site.layer, feature=node.feature, error=node.is_error,
                effect=effect, label=label)  # fmt: skip


def select_nodes(
    scores: Mapping[E.Node, float], *, max_nodes: "int | None" = None, threshold: "float | None" = None
) -> list[E.Node]:
    """The nodes with |score| ≥ ``threshold`` (all, when None), at most ``max_nodes`` of them by |score|."""
    ranked = sorted(scores, key=lambda n: -abs(scores[n]))
    if threshold is not None:
        ranked = [n for n in ranked if abs(scores[n]) >= threshold]
    return ranked[:max_nodes] if max_nodes is not None else ranked


def feature_circuit(
    model: Any,
    dictionaries: Mapping[str, Dictionary],
    pairs: PromptPairs,
    *,
    metric: str = "logit_diff",
    method: str = "atp",
    steps: int = 10,
    max_nodes: "int | None" = 60,
    node_threshold: "float | None" = None,
    edge_threshold: float = 0.0,
    labels: "Mapping[str, str] | None" = None,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[FeatureCircuit, E.NodeEffects, E.PairActivations]:
    """The feature circuit of ``pairs`` through the dictionaries at every site given (error nodes included).

    Nodes: the top ``max_nodes`` by |estimated effect| (and |effect| ≥ ``node_threshold`` when given); edges
    among them and into the logits with |ê| ≥ ``edge_threshold``. Returns the circuit, every node's effects
    (for faithfulness curves over n) and the recorded activations (for :meth:`check`-style exact effects).
    """
    m = E.make_metric(model, pairs, metric, batch_size)
    t0 = time.perf_counter()
    _, acts = E.node_effects(model, dictionaries, pairs, metric=m, method="atp", batch_size=batch_size,
                             progress=progress)  # fmt: skip
    if method == "atp":
        effects, _ = E.node_effects(model, dictionaries, pairs, metric=m, activations=acts)
    else:
        effects, _ = E.node_effects(model, dictionaries, pairs, metric=m, method=method, steps=steps,
                                    activations=acts, batch_size=batch_size, progress=progress)  # fmt: skip
    t1 = time.perf_counter()
    scores = effects.node_scores()
    kept = select_nodes(scores, max_nodes=max_nodes, threshold=node_threshold)
    edges = E.edge_effects(model, dictionaries, pairs, kept, acts, metric=m, batch_size=batch_size,
                           progress=progress)  # fmt: skip
    t2 = time.perf_counter()
    n_layers = sites_mod.n_layers(model)
    g = nx.DiGraph()
    for node in kept:
        label = (labels or {}).get(node_id(node), "")
        g.add_node(node_id(node), **_node_attrs(node, scores[node], n_layers, label))
    g.add_node("logits", **_node_attrs(E.LOGITS, float(effects.base_metric.mean()), n_layers))
    for (u, d), value in edges.scores().items():
        if abs(value) >= edge_threshold and value != 0.0:
            g.add_edge(node_id(u), node_id(d), effect=value)
    circuit = FeatureCircuit(
        graph=g, model=model_name(model), metric=m.kind, method=method, steps=steps if method == "ig" else None,
        sites=list(acts.sites), prompts=len(pairs), node_threshold=node_threshold, edge_threshold=edge_threshold,
        max_nodes=max_nodes, base_metric=float(effects.base_metric.mean()),
        seconds={"nodes": t1 - t0, "edges": t2 - t1},
    )  # fmt: skip
    return circuit, effects, acts


# -- faithfulness and completeness ------------------------------------------------------------------------------
@dataclass
class Ablation:
    """What an ablated node is set to, per site: the mean over the target prompts of its code (``codes``
    ``[T, F]``) and error (``errors`` ``[T, d]``) at each position ("mean"), or each prompt's own target
    value ("patch": ``codes`` ``[N, T, F]``, ``errors`` ``[N, T, d]``)."""

    kind: str
    codes: dict[str, torch.Tensor]
    errors: dict[str, torch.Tensor]


@torch.no_grad()
def make_ablation(
    dictionaries: Mapping[str, Dictionary], pairs: PromptPairs, acts: E.PairActivations, kind: str = "mean"
) -> Ablation:
    """The values ablated nodes take (:class:`Ablation`), from the target runs in ``acts``."""
    if kind not in ABLATIONS:
        raise CircuitSAEError(f"ablation must be one of {', '.join(ABLATIONS)}, got {kind!r}")
    codes, errors = {}, {}
    valid = (torch.arange(pairs.base.shape[1])[None] < pairs.lengths[:, None]).to(torch.float64)  # [N, T]
    for s in acts.sites:
        d = dictionaries[s]
        xt = acts.target[s].to(d.W_dec)
        c = d.encode(xt)
        e = xt - d.decode(c)
        if kind == "patch":
            codes[s], errors[s] = c.cpu(), e.cpu()
        else:
            w = valid.to(c)[..., None]
            count = w.sum(0).clamp(min=1)
            codes[s], errors[s] = ((c * w).sum(0) / count).cpu(), ((e * w).sum(0) / count).cpu()
    return Ablation(kind, codes, errors)


@torch.no_grad()
def ablated_metric(
    model: Any,
    dictionaries: Mapping[str, Dictionary],
    pairs: PromptPairs,
    keep: "Sequence[E.Node] | None",
    ablation: Ablation,
    metric: E.Metric,
    starts: Mapping[str, int],
    *,
    invert: bool = False,
    batch_size: int = 16,
) -> torch.Tensor:
    """m per prompt with every node not in ``keep`` set to its ablated value at every position (``keep`` None:
    nothing ablated); ``invert`` ablates the nodes in ``keep`` instead and keeps the rest."""
    order = [str(s) for s in sites_mod.resolve(model, list(dictionaries))]
    kept_feats: dict[str, list[int]] = {s: [] for s in order}
    kept_err = {s: False for s in order}
    for node in keep or []:
        if node.site in kept_feats:
            if node.is_error:
                kept_err[node.site] = True
            else:
                kept_feats[node.site].append(int(node.feature))
    out = []
    for rows in E.batches(len(pairs), batch_size):
        with model.trace(pairs.base[rows].to(input_device(model))):
            if keep is not None:
                for s in order:
                    d, start = dictionaries[s], starts[s]
                    x = sites_mod.read(model, s)
                    xs = x[:, start:].to(d.W_dec.dtype)
                    c = d.encode(xs)
                    e = xs - d.decode(c)
                    if ablation.kind == "mean":
                        c_abl = ablation.codes[s][start : x.shape[1]].to(c)[None].expand_as(c)
                        e_abl = ablation.errors[s][start : x.shape[1]].to(e)[None].expand_as(e)
                    else:
                        c_abl = ablation.codes[s][rows, start : x.shape[1]].to(c)
                        e_abl = ablation.errors[s][rows, start : x.shape[1]].to(e)
                    member = torch.zeros(c.shape[-1], dtype=torch.bool, device=c.device)
                    member[kept_feats[s]] = True
                    if invert:
                        member = ~member
                    c_new = torch.where(member, c, c_abl)
                    e_new = e if kept_err[s] != invert else e_abl
                    x[:, start:] = (d.decode(c_new) + e_new).to(x.dtype)
            logits = logits_of(model).save()
        out.append(metric(logits, rows).cpu())
    return torch.cat(out)


@dataclass
class Faithfulness:
    """Faithfulness F(C) = (m(C) − m(∅)) / (m(M) − m(∅)) of the top-n circuits, and completeness (the same with
    C ablated and the rest kept), means over prompts. ``errors``: whether error nodes could join a circuit."""

    n: list[int]
    faithfulness: list[float]
    completeness: list[float]
    m_model: float
    m_empty: float
    ablation: str
    errors: bool

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def nodes_for(self, level: float) -> "int | None":
        """The smallest n whose faithfulness reaches ``level`` (None if none does)."""
        return next((n for n, f in zip(self.n, self.faithfulness) if f >= level), None)


def faithfulness(
    model: Any,
    dictionaries: Mapping[str, Dictionary],
    pairs: PromptPairs,
    scores: Mapping[E.Node, float],
    acts: E.PairActivations,
    *,
    sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    metric: "str | E.Metric" = "logit_diff",
    ablation: str = "mean",
    errors: bool = True,
    completeness: bool = True,
    batch_size: int = 16,
) -> Faithfulness:
    """Faithfulness (and completeness) of the circuits of the top-n nodes by |score|, for each n in ``sizes``.

    ``errors=False`` leaves error nodes out of every circuit (they are always ablated), as a circuit of
    features alone.
    """
    m = metric if isinstance(metric, E.Metric) else E.make_metric(model, pairs, metric, batch_size)
    abl = make_ablation(dictionaries, pairs, acts, ablation)
    pool = {n: v for n, v in scores.items() if errors or not n.is_error}
    ranked = select_nodes(pool)

    def run(keep: "list[E.Node] | None", invert: bool = False) -> float:
        return float(ablated_metric(model, dictionaries, pairs, keep, abl, m, acts.starts, invert=invert,
                                    batch_size=batch_size).mean())  # fmt: skip

    m_model, m_empty = run(None), run([])
    denom = m_model - m_empty
    if abs(denom) < 1e-12:
        raise CircuitSAEError("the model and the fully ablated model give the same metric: faithfulness is undefined")
    ns, faith, comp = [], [], []
    for n in sizes:
        if n > len(ranked) and ns and ns[-1] == len(ranked):
            break
        n = min(int(n), len(ranked))
        keep = ranked[:n]
        ns.append(n)
        faith.append((run(keep) - m_empty) / denom)
        comp.append((run(keep, invert=True) - m_empty) / denom if completeness else math.nan)
    return Faithfulness(ns, faith, comp, m_model, m_empty, ablation, errors)
