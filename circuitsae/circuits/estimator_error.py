"""How far a circuit's estimated effects are from exact patching (REFERENCE §8, "known weaknesses").

:func:`check_circuit` takes a circuit and the estimates it came from, measures the exact effect of every node
in it and of a stratified sample of the others (equal numbers from each band of |estimate|, the band of
estimates ≈ 0 included, so that false negatives can show), and of a sample of its edges, then reports per
estimator, overall and per site kind and layer band: Spearman rank correlation, median relative error, sign
agreement and the false-negative rate (of the checked nodes in the top 5% by |exact effect|, the share the
estimate leaves out of the circuit). The exact values are written onto the circuit's nodes and edges.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from circuitsae import sites as sites_mod
from circuitsae.circuits import effects as E
from circuitsae.circuits.circuit import FeatureCircuit, node_id, parse_node, select_nodes
from circuitsae.dictionaries import Dictionary
from circuitsae.tasks.pairs import PromptPairs

#: relative errors are taken against max(|exact|, this share of the largest |exact| checked)
RELATIVE_FLOOR = 1e-3
#: bands of |estimate| the sample of nodes outside the circuit is drawn from (quantile edges)
BANDS = 5


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN with fewer than 3 pairs or a constant side."""
    if len(a) < 3:
        return math.nan

    def ranks(x: Sequence[float]) -> torch.Tensor:
        t = torch.tensor(x, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(t), dtype=torch.float64)
        for v in t.unique():  # average ties
            same = t == v
            if same.sum() > 1:
                r[same] = r[same].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else math.nan


@dataclass
class ErrorStats:
    """Agreement of one estimator with exact patching on a group of nodes (or edges)."""

    count: int
    spearman: float
    median_relative_error: float
    sign_agreement: float
    false_negative_rate: "float | None" = None

    @classmethod
    def of(cls, est: Sequence[float], exact: Sequence[float], kept: "Sequence[bool] | None" = None) -> "ErrorStats":
        if not exact:
            return cls(0, math.nan, math.nan, math.nan, None)
        floor = RELATIVE_FLOOR * max(abs(x) for x in exact)
        rel = sorted(abs(e - x) / max(abs(x), floor) for e, x in zip(est, exact)) if floor > 0 else [math.nan]
        signed = [(e, x) for e, x in zip(est, exact) if abs(x) > floor]
        sign = sum((e > 0) == (x > 0) for e, x in signed) / len(signed) if signed else math.nan
        fnr = None
        if kept is not None:
            n_top = max(1, math.ceil(0.05 * len(exact)))
            top = sorted(range(len(exact)), key=lambda i: -abs(exact[i]))[:n_top]
            fnr = sum(not kept[i] for i in top) / n_top
        return cls(len(exact), spearman(est, exact), rel[len(rel) // 2], sign, fnr)


@dataclass
class EstimatorError:
    """The check of one circuit: per estimator, node statistics overall and by group (``"kind:resid"``,
    ``"band:0-9"``, ``"error nodes"``), edge statistics, and the checked values themselves."""

    nodes: dict[str, dict[str, ErrorStats]]
    edges: dict[str, ErrorStats]
    checked_nodes: list[dict[str, Any]] = field(default_factory=list)
    checked_edges: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def stats(s: ErrorStats) -> dict[str, Any]:
            return {f.name: getattr(s, f.name) for f in fields(s)}

        return {
            "nodes": {m: {g: stats(s) for g, s in by.items()} for m, by in self.nodes.items()},
            "edges": {m: stats(s) for m, s in self.edges.items()},
            "checked_nodes": self.checked_nodes,
            "checked_edges": self.checked_edges,
            "seconds": self.seconds,
        }


def _bands(n_layers: int) -> list[tuple[int, int]]:
    third = max(1, math.ceil(n_layers / 3))
    return [(lo, min(n_layers, lo + third) - 1) for lo in range(0, n_layers, third)]


def sample_nodes(scores: Mapping[E.Node, float], kept: Sequence[E.Node], n: int, seed: int = 0) -> list[E.Node]:
    """``n`` nodes outside ``kept``, equal numbers from each of :data:`BANDS` quantile bands of |score| (the
    lowest band holds the nodes estimated ≈ 0)."""
    rng = random.Random(seed)
    inside = set(kept)
    rest = sorted((nd for nd in scores if nd not in inside), key=lambda nd: abs(scores[nd]))
    if n >= len(rest):
        return rest
    bands = [rest[len(rest) * b // BANDS : len(rest) * (b + 1) // BANDS] for b in range(BANDS)]
    out: list[E.Node] = []
    for b, band in enumerate(bands):
        take = n // BANDS + (1 if b < n % BANDS else 0)
        out += rng.sample(band, min(take, len(band)))
    return out


def check_circuit(
    circuit: FeatureCircuit,
    model: Any,
    dictionaries: Mapping[str, Dictionary],
    pairs: PromptPairs,
    estimates: Mapping[str, E.NodeEffects],
    acts: E.PairActivations,
    *,
    n_nodes: int = 300,
    n_edges: int = 200,
    edge_estimates: "E.EdgeEffects | None" = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> EstimatorError:
    """Exact effects of the circuit's nodes plus ``n_nodes`` others (stratified) and of ``n_edges`` of its edges,
    compared with each estimator in ``estimates`` (``{"atp": ..., "ig": ...}``); writes ``exact`` onto the
    circuit's nodes and edges."""
    metric = E.make_metric(model, pairs, circuit.metric or "logit_diff", batch_size)
    kept = circuit.members()
    first = next(iter(estimates.values()))
    scores = first.node_scores()
    for nd in kept:
        scores.setdefault(nd, 0.0)
    others = sample_nodes(scores, kept, n_nodes, seed)
    nodes = kept + others
    t0 = time.perf_counter()
    exact = E.exact_effects(model, dictionaries, pairs, nodes, acts, metric=metric, batch_size=batch_size,
                            progress=progress).mean(1).tolist()  # fmt: skip
    t1 = time.perf_counter()
    for nd, x in zip(kept, exact):
        circuit.graph.nodes[node_id(nd)]["exact"] = x
    n_layers = sites_mod.n_layers(model)
    groups: dict[str, list[int]] = {"all": list(range(len(nodes)))}
    for i, nd in enumerate(nodes):
        site = sites_mod.Site.parse(nd.site)
        groups.setdefault("error nodes" if nd.is_error else f"kind:{site.kind}", []).append(i)
        lo, hi = next(b for b in _bands(n_layers) if b[0] <= site.layer <= b[1])
        groups.setdefault(f"band:{lo}-{hi}", []).append(i)
    node_stats: dict[str, dict[str, ErrorStats]] = {}
    checked = [{"node": node_id(nd), "in_circuit": i < len(kept), "exact": exact[i]} for i, nd in enumerate(nodes)]
    for method, eff in estimates.items():
        sc = eff.node_scores()
        est = [sc.get(nd, 0.0) for nd in nodes]
        selected = set(select_nodes(sc, max_nodes=circuit.max_nodes, threshold=circuit.node_threshold))
        in_circuit = [nd in selected for nd in nodes]
        for row, e in zip(checked, est):
            row[method] = e
        node_stats[method] = {
            g: ErrorStats.of([est[i] for i in idx], [exact[i] for i in idx], [in_circuit[i] for i in idx])
            for g, idx in groups.items()
        }
    # edges: the circuit's, the strongest first, then a seeded sample of the rest
    all_edges = sorted(circuit.graph.edges(data=True), key=lambda e: -abs(e[2]["effect"]))
    rng = random.Random(seed)
    head = all_edges[: n_edges // 2]
    tail = all_edges[n_edges // 2 :]
    picked = head + rng.sample(tail, min(len(tail), n_edges - len(head)))
    pairs_uv = [(parse_node(u), parse_node(v)) for u, v, _ in picked]
    exact_edges = E.exact_edge_effects(model, dictionaries, pairs, pairs_uv, acts, metric=metric,
                                       batch_size=batch_size, progress=progress).mean(1).tolist()  # fmt: skip
    t2 = time.perf_counter()
    for (u, v, _), x in zip(picked, exact_edges):
        circuit.graph.edges[u, v]["exact"] = x
    # edges are estimated by ∇m·∂d/∂u·Δu (attribution) whatever estimated the nodes
    edge_stats = {"atp": ErrorStats.of([e["effect"] for *_, e in picked], exact_edges)}
    checked_edges = [{"edge": [u, v], "estimate": e["effect"], "exact": x} for (u, v, e), x in zip(picked, exact_edges)]
    return EstimatorError(node_stats, edge_stats, checked, checked_edges, {"nodes": t1 - t0, "edges": t2 - t1})
