"""Draw a whole-model feature circuit (:class:`circuitsae.circuits.circuit.FeatureCircuit`).

:func:`to_dot` lays it out for graphviz: one rank per layer for its residual stream and one below it for its attention and MLP
outputs (in that order), the earliest at the bottom and the logits on top (edges run upstream → downstream,
upwards), features as rounded boxes labelled ``site/feature`` with their top tokens and effect, error nodes as
grey diamonds, edge width ∝ |ê| and colour by sign (blue raises the metric, red lowers it). The circuit is
pruned first (:meth:`~circuitsae.circuits.circuit.FeatureCircuit.prune`: at most ``max_nodes`` nodes by
|effect|, edges below ``min_edge`` dropped); the legend states the rule and what was left out.
:func:`render` writes ``stem.dot``, ``stem.json`` and, with graphviz's ``dot``, ``stem.svg`` and ``stem.png``.
"""

from __future__ import annotations

from pathlib import Path

import graphviz

from circuitsae.circuits.circuit import FeatureCircuit
from circuitsae.viz.render import MAX_PENWIDTH, write_drawing

POSITIVE, NEGATIVE = "#1f77b4", "#d62728"
KIND_ORDER = {"resid": 0, "attn": 1, "mlp": 2}
FILL = {"resid": "#e8f0fb", "attn": "#fdf0e2", "mlp": "#e6f5e6"}


def _text(s: str) -> str:
    return str(s).replace("\\", "\\\\").replace("\n", "\\n").replace('"', "'")


def _id(node: str) -> str:
    return "n_" + node.replace(".", "_").replace("/", "_").replace("@", "_at_")


def to_dot(circuit: FeatureCircuit, max_nodes: int = 60, min_edge: float = 0.0) -> graphviz.Digraph:
    """A ``graphviz.Digraph`` of the pruned circuit with a legend."""
    pruned = circuit.prune(max_nodes, min_edge)
    g = pruned.graph
    dot = graphviz.Digraph("feature_circuit", graph_attr={"rankdir": "BT", "nodesep": "0.25", "ranksep": "0.5"})
    dot.attr("node", shape="box", style="rounded,filled", fontname="Helvetica", fontsize="11")
    dot.attr("edge", fontname="Helvetica", fontsize="9", arrowsize="0.6")
    # two ranks a layer: attention and MLP below, the residual stream (which they write into) above
    by_layer: dict[tuple[int, int], list[str]] = {}
    for v, d in g.nodes(data=True):
        by_layer.setdefault((int(d["layer"]), int(d["kind"] in ("resid", "logits"))), []).append(v)
    for layer in sorted(by_layer):
        with dot.subgraph(name=f"rank_{layer[0]}_{layer[1]}") as sub:
            sub.attr(rank="same")
            nodes = sorted(by_layer[layer], key=lambda v: (KIND_ORDER.get(g.nodes[v]["kind"], 3), v))
            for v in nodes:
                d = g.nodes[v]
                if d["kind"] == "logits":
                    sub.node(_id(v), _text(f"metric ({circuit.metric})\nbase {d['effect']:.3g}"), shape="ellipse",
                             fillcolor="#fff3c4")  # fmt: skip
                    continue
                lines = [v, d.get("label") or "", f"effect {d['effect']:+.3g}"]
                if d.get("exact") is not None:
                    lines.append(f"exact {d['exact']:+.3g}")
                text = _text("\n".join(x for x in lines if x))
                tip = _text(f"{v}: estimated {d['effect']:+.4g}"
                            + (f", exact {d['exact']:+.4g}" if d.get("exact") is not None else ", exact: not checked")
                            + (f"; {d['label']}" if d.get("label") else ""))  # fmt: skip
                if d["error"]:
                    sub.node(_id(v), text, shape="diamond", style="filled", fillcolor="#dddddd", fontsize="10",
                             tooltip=tip)  # fmt: skip
                else:
                    sub.node(_id(v), text, fillcolor=FILL.get(d["kind"], "white"), tooltip=tip)
            for a, b in zip(nodes, nodes[1:]):  # keep the column order within a layer
                sub.edge(_id(a), _id(b), style="invis")
    effects = [abs(e["effect"]) for *_, e in g.edges(data=True)]
    top = max(effects, default=1.0) or 1.0
    for u, v, e in sorted(g.edges(data=True), key=lambda edge: abs(edge[2]["effect"])):
        colour = POSITIVE if e["effect"] >= 0 else NEGATIVE
        width = max(0.4, MAX_PENWIDTH * abs(e["effect"]) / top)
        dot.edge(_id(u), _id(v), color=colour, penwidth=f"{width:.2f}", tooltip=f"{u} -> {v}: {e['effect']:+.3g}")
    dropped = circuit.number_of_nodes() - pruned.number_of_nodes()
    legend = (
        f"feature circuit of {circuit.model or '?'}: metric {circuit.metric or '?'} on {circuit.prompts or '?'} "
        f"prompt pairs, node effects by {circuit.method or '?'}\n"
        f"drawn: the {max_nodes} nodes of largest |effect| linked by an edge with |effect| >= {min_edge:g}"
        + (f" ({dropped} more not drawn)" if dropped else "")
        + "\nboxes: features (blue resid, orange attn, green mlp); grey diamonds: error nodes (what the SAE misses)\n"
        "edge width: |effect| of the edge; blue raises the metric, red lowers it"
    )
    with dot.subgraph(name="cluster_legend") as leg:
        leg.attr(label="legend", fontname="Helvetica", fontsize="10", style="dashed")
        leg.node("legend", _text(legend), shape="plaintext", style="", fontsize="10")
    return dot


def render(
    circuit: FeatureCircuit, out_stem: "str | Path", max_nodes: int = 60, min_edge: float = 0.0
) -> dict[str, str]:
    """Write ``out_stem`` + ``.dot``, ``.json`` (the whole circuit) and, with ``dot``, ``.svg`` and ``.png``."""
    return write_drawing(to_dot(circuit, max_nodes, min_edge), circuit.to_json(), out_stem)
