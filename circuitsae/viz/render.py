"""Draw a causal tree (:func:`circuitsae.circuits.trees.causal_tree`) as a circuit diagram.

:func:`to_dot` lays the graph out for graphviz: one rank per site, the
earliest at the top (edges run parent → child, downwards), edge width
proportional to the effect, every node labelled ``site:feature`` with its top
tokens, and a legend saying what the widths mean. :func:`render` writes
``stem.dot``, ``stem.svg``, ``stem.png`` (through the ``dot`` binary) and
``stem.json`` (networkx node-link data, readable by other tools). Large
graphs are pruned first (:func:`prune`): edges below ``min_effect`` go, then
only the ``max_nodes`` nodes with the strongest edges are kept.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import graphviz
import networkx as nx

from circuitsae import sites as sites_mod
from circuitsae.io import atomic_write

MISSING_DOT = (
    "graphviz 'dot' not found: install the Debian package graphviz (apt-get install graphviz); wrote DOT and JSON"
)
MAX_PENWIDTH = 8.0


def prune(graph: nx.DiGraph, max_nodes: int = 40, min_effect: float = 0.0) -> nx.DiGraph:
    """The target plus at most ``max_nodes − 1`` nodes ranked by their strongest edge, still connected to it."""
    g = graph.copy()
    g.remove_edges_from([(u, v) for u, v, e in graph.edges(data=True) if e["effect"] < min_effect])
    target = graph.graph.get("target")
    strength = {v: max((e["effect"] for *_, e in g.out_edges(v, data=True)), default=0.0) for v in g}
    if target in strength:
        strength[target] = float("inf")
    keep = sorted(strength, key=strength.get, reverse=True)[:max_nodes]
    g = g.subgraph(keep).copy()
    if target in g:
        g = g.subgraph(nx.ancestors(g, target) | {target}).copy()
    g.graph["pruned_nodes"] = graph.number_of_nodes() - g.number_of_nodes()
    return g


def _text(s: str) -> str:
    """DOT label text: backslashes doubled (graphviz reads them as escapes), line breaks as ``\\n``."""
    return str(s).replace("\\", "\\\\").replace("\n", "\\n")


def _id(node: str) -> str:
    """A DOT node id for ``"site:feature"`` (in DOT a colon would start a port name)."""
    return node.replace(":", "_")


def to_dot(graph: nx.DiGraph, max_nodes: int = 40, min_effect: float = 0.0) -> graphviz.Digraph:
    """A ``graphviz.Digraph`` of the (pruned) graph: ranks by site, penwidth ∝ effect, with a legend."""
    g = prune(graph, max_nodes, min_effect)
    a = graph.graph
    dot = graphviz.Digraph("causal_tree", graph_attr={"rankdir": "TB", "nodesep": "0.3", "ranksep": "0.6"})
    dot.attr("node", shape="box", style="rounded,filled", fillcolor="white", fontname="Helvetica", fontsize="11")
    dot.attr("edge", color="#1f77b4", fontname="Helvetica", fontsize="9")
    by_site: dict[str, list[str]] = {}
    for v, d in g.nodes(data=True):
        by_site.setdefault(d["site"], []).append(v)
    for site in sorted(by_site, key=lambda s: sites_mod.Site.parse(s).sort_key()):
        with dot.subgraph(name=f"rank_{site}") as sub:
            sub.attr(rank="same")
            for v in sorted(by_site[site]):
                d = g.nodes[v]
                big = d.get("max_activation")
                lines = [v, d.get("label") or "", f"max {big:.3g}" if big is not None else ""]
                fill = "#ffe9a8" if v == a.get("target") else "white"
                sub.node(_id(v), _text("\n".join(x for x in lines if x)), fillcolor=fill)
    effects = [e["effect"] for *_, e in g.edges(data=True)]
    top = max(effects, default=1.0) or 1.0
    for u, v, e in sorted(g.edges(data=True), key=lambda t: t[2]["effect"]):
        rel = e.get("relative")
        label = f"{e['effect']:.3g}" + (f" ({100 * rel:.0f}%)" if rel is not None else "")
        dot.edge(_id(u), _id(v), label=label, penwidth=f"{max(0.5, MAX_PENWIDTH * e['effect'] / top):.2f}")
    legend = (
        f"causal tree of {a.get('target', '?')} on {a.get('model', '?')}\n"
        "edge: parent ablated (x <- x - c f where c > 0) at its site;\n"
        "width and label: mean decrease of the child's activation (share of its mean)\n"
        f"{a.get('contexts', '?')} contexts with the target in [M/2, M], M = {a.get('target_max_activation', 0):.3g}"
        + (
            "; every parent on its own contexts (paper)"
            if a.get("mode") == "paper"
            else "; every level on the target's contexts (shared)"
            if a.get("mode") == "shared"
            else ""
        )
        + f"; {a.get('seconds', 0):.1f} s"
        + (f"\n{g.graph['pruned_nodes']} weaker nodes not drawn" if g.graph["pruned_nodes"] else "")
    )
    with dot.subgraph(name="cluster_legend") as leg:
        leg.attr(label="legend", fontname="Helvetica", fontsize="10", style="dashed")
        leg.node("legend", _text(legend), shape="plaintext", fillcolor="none", fontsize="9")
    return dot


def render(graph: nx.DiGraph, out_stem: "str | Path", max_nodes: int = 40, min_effect: float = 0.0) -> dict[str, str]:
    """Write ``out_stem`` + ``.dot``, ``.json`` and, when graphviz's ``dot`` is installed, ``.svg`` and ``.png``.

    Without ``dot`` it warns (naming the Debian package) and writes DOT and JSON only.
    Returns the paths written, by format.
    """
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    dot = to_dot(graph, max_nodes, min_effect)
    paths = {fmt: Path(f"{stem}.{fmt}") for fmt in ("dot", "json")}
    atomic_write(paths["dot"], dot.source.encode())
    data = nx.node_link_data(graph, edges="edges")
    atomic_write(paths["json"], json.dumps(data, indent=1).encode())
    if shutil.which("dot") is None:
        warnings.warn(MISSING_DOT, stacklevel=2)
        return {k: str(p) for k, p in paths.items()}
    for fmt in ("svg", "png"):
        paths[fmt] = Path(f"{stem}.{fmt}")
        atomic_write(paths[fmt], dot.pipe(format=fmt))
    return {k: str(p) for k, p in paths.items()}
