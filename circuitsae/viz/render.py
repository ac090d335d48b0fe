"""Draw a causal tree (:class:`circuitsae.circuits.trees.CausalTree`) as a circuit diagram.

:func:`to_dot` lays the tree out for graphviz: one rank per site, the
earliest at the top (edges run parent → child, downwards), edge width
proportional to the effect, every node labelled ``site:feature`` with its top
tokens, the target filled with :data:`TARGET_FILL`, and a legend saying what
the widths mean. :func:`render` writes ``stem.dot``, ``stem.svg``,
``stem.png`` (through the ``dot`` binary) and ``stem.json`` (the tree's
:meth:`~circuitsae.circuits.trees.CausalTree.to_json`: networkx node-link
data, readable by other tools). Large trees are pruned first
(:meth:`~circuitsae.circuits.trees.CausalTree.prune`): edges below
``min_effect`` go, then only the ``max_nodes`` nodes with the strongest edges
are kept. Both take a :class:`~circuitsae.circuits.trees.CausalTree` or a
``networkx.DiGraph`` with its fields as graph attributes.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import graphviz
import networkx as nx

from circuitsae import sites as sites_mod
from circuitsae.circuits.trees import CausalTree
from circuitsae.io import atomic_write

MISSING_DOT = (
    "graphviz 'dot' not found: install the Debian package graphviz (apt-get install graphviz); wrote DOT and JSON"
)
MAX_PENWIDTH = 8.0


#: The fill of the tree's target node; the HTML report (:mod:`circuitsae.viz.report`) finds the target by it.
TARGET_FILL = "#ffe9a8"


def _tree(tree: "CausalTree | nx.DiGraph") -> CausalTree:
    return tree if isinstance(tree, CausalTree) else CausalTree.from_graph(tree)


def _or(value: Any, default: Any) -> Any:
    """``value``, or ``default`` where the tree does not know it (None)."""
    return default if value is None else value


def _text(s: str) -> str:
    """DOT label text: backslashes doubled (graphviz reads them as escapes), line breaks as ``\\n``."""
    return str(s).replace("\\", "\\\\").replace("\n", "\\n")


def _id(node: str) -> str:
    """A DOT node id for ``"site:feature"`` (in DOT a colon would start a port name)."""
    return node.replace(":", "_")


def to_dot(tree: "CausalTree | nx.DiGraph", max_nodes: int = 40, min_effect: float = 0.0) -> graphviz.Digraph:
    """A ``graphviz.Digraph`` of the (pruned) tree: ranks by site, penwidth ∝ effect, with a legend."""
    t = _tree(tree)
    pruned = t.prune(max_nodes, min_effect)
    g, dropped = pruned.graph, t.number_of_nodes() - pruned.number_of_nodes()
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
                fill = TARGET_FILL if v == t.target else "white"
                sub.node(_id(v), _text("\n".join(x for x in lines if x)), fillcolor=fill)
    effects = [e["effect"] for *_, e in g.edges(data=True)]
    top = max(effects, default=1.0) or 1.0
    for u, v, e in sorted(g.edges(data=True), key=lambda edge: edge[2]["effect"]):
        rel = e.get("relative")
        label = f"{e['effect']:.3g}" + (f" ({100 * rel:.0f}%)" if rel is not None else "")
        dot.edge(_id(u), _id(v), label=label, penwidth=f"{max(0.5, MAX_PENWIDTH * e['effect'] / top):.2f}")
    modes = {
        "paper": "; every parent on its own contexts (paper)",
        "shared": "; every level on the target's contexts (shared)",
    }
    legend = (
        f"causal tree of {_or(t.target, '?')} on {_or(t.model, '?')}\n"
        "edge: parent ablated (x <- x - c f where c > 0) at its site;\n"
        "width and label: mean decrease of the child's activation (share of its mean)\n"
        f"{_or(t.contexts, '?')} contexts with the target in [M/2, M], M = {_or(t.target_max_activation, 0):.3g}"
        + modes.get(t.mode, "")
        + f"; {_or(t.seconds, 0):.1f} s"
        + (f"\n{dropped} weaker nodes not drawn" if dropped else "")
    )
    with dot.subgraph(name="cluster_legend") as leg:
        leg.attr(label="legend", fontname="Helvetica", fontsize="10", style="dashed")
        leg.node("legend", _text(legend), shape="plaintext", fillcolor="none", fontsize="9")
    return dot


def render(
    tree: "CausalTree | nx.DiGraph", out_stem: "str | Path", max_nodes: int = 40, min_effect: float = 0.0
) -> dict[str, str]:
    """Write ``out_stem`` + ``.dot``, ``.json`` and, when graphviz's ``dot`` is installed, ``.svg`` and ``.png``.

    Without ``dot`` it warns (naming the Debian package) and writes DOT and JSON only.
    Returns the paths written, by format.
    """
    t = _tree(tree)
    return write_drawing(to_dot(t, max_nodes, min_effect), t.to_json(), out_stem)


def write_drawing(dot: graphviz.Digraph, data: Any, out_stem: "str | Path") -> dict[str, str]:
    """Write ``out_stem`` + ``.dot``, ``.json`` (``data``) and, with graphviz's ``dot``, ``.svg`` and ``.png``."""
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {fmt: Path(f"{stem}.{fmt}") for fmt in ("dot", "json")}
    atomic_write(paths["dot"], dot.source.encode())
    atomic_write(paths["json"], json.dumps(data, indent=1).encode())
    if shutil.which("dot") is None:
        warnings.warn(MISSING_DOT, stacklevel=2)
        return {k: str(p) for k, p in paths.items()}
    for fmt in ("svg", "png"):
        paths[fmt] = Path(f"{stem}.{fmt}")
        atomic_write(paths[fmt], dot.pipe(format=fmt))
    return {k: str(p) for k, p in paths.items()}
