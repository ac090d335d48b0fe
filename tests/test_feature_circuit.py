"""Whole-model feature circuits on the tiny model: the graph, faithfulness, the exact check, the drawing."""

from __future__ import annotations

import json
import shutil

import networkx as nx
import pytest
import torch

from circuitsae import sites
from circuitsae.circuits import effects as E
from circuitsae.circuits.circuit import (
    FeatureCircuit,
    ablated_metric,
    faithfulness,
    feature_circuit,
    make_ablation,
    parse_node,
)
from circuitsae.circuits.estimator_error import ErrorStats, check_circuit, sample_nodes, spearman
from circuitsae.dictionaries import IdentityDictionary, TopKSAE
from circuitsae.errors import CircuitSAEError
from circuitsae.tasks.ioi import make_ioi


@pytest.fixture(scope="module")
def built(tiny_llama):
    torch.manual_seed(0)
    d = sites.d_model(tiny_llama)
    dicts = {}
    for s in sites.resolve(tiny_llama, ["all"]):
        dicts[str(s)] = TopKSAE(d, 96, k=8)
        dicts[str(s)].meta = {"site": str(s), "first_position": 1}
    pairs = make_ioi(tiny_llama, n=6, seed=1)
    circuit, effects, acts = feature_circuit(tiny_llama, dicts, pairs, max_nodes=12)
    return tiny_llama, dicts, pairs, circuit, effects, acts


def test_a_circuit_keeps_the_top_nodes_joins_them_by_edges_and_round_trips_through_json(built, tmp_path):
    model, dicts, pairs, circuit, effects, acts = built
    assert circuit.number_of_nodes() == 13 and "logits" in circuit.graph  # 12 nodes + the metric
    top = {str(n) for n, _ in effects.top(12)}
    assert set(circuit.graph) - {"logits"} == top
    assert circuit.number_of_edges() > 0
    for u, v, e in circuit.edges(data=True):
        assert e["effect"] != 0
        pu, pv = parse_node(u), parse_node(v)
        assert pv == E.LOGITS or pu.site in E.upstream_sites(pv.site, acts.sites)
    again = FeatureCircuit.from_json(json.loads(json.dumps(circuit.to_json())))
    assert nx.utils.graphs_equal(again.graph, circuit.graph)
    assert again.to_json() == circuit.to_json()
    assert again.method == "atp" and again.prompts == 6 and again.sites == list(acts.sites)
    small = circuit.prune(max_nodes=4)
    assert small.number_of_nodes() <= 5 and all(small.graph.degree(v) > 0 for v in small.graph)
    with pytest.raises(CircuitSAEError, match="max_nodes"):
        circuit.prune(max_nodes=0)


def test_faithfulness_of_the_whole_model_is_one_and_of_the_empty_circuit_zero(built):
    model, dicts, pairs, circuit, effects, acts = built
    metric = E.make_metric(model, pairs)
    abl = make_ablation(dicts, pairs, acts, "mean")
    everything = [E.Node(s, i) for s in acts.sites for i in range(dicts[s].d_dict)] + [
        E.Node(s, None) for s in acts.sites
    ]
    whole = ablated_metric(model, dicts, pairs, everything, abl, metric, acts.starts)
    torch.testing.assert_close(whole, acts.base_metric, rtol=1e-4, atol=1e-4)  # keeping every node is the model
    empty = ablated_metric(model, dicts, pairs, [], abl, metric, acts.starts)
    nothing = ablated_metric(model, dicts, pairs, everything, abl, metric, acts.starts, invert=True)
    torch.testing.assert_close(empty, nothing)  # ablating every node = keeping none
    f = faithfulness(model, dicts, pairs, effects.node_scores(), acts, sizes=(1, 4, 10_000))
    assert f.m_model == pytest.approx(float(acts.base_metric.mean()), abs=1e-4)
    assert f.m_empty == pytest.approx(float(empty.mean()), abs=1e-6)
    assert f.n[-1] == len(effects.node_scores())
    feats_only = faithfulness(model, dicts, pairs, effects.node_scores(), acts, sizes=(4,), errors=False)
    assert feats_only.errors is False and len(feats_only.faithfulness) == 1
    # patching to each prompt's own counterfactual: the empty circuit is the target run's metric
    own = make_ablation(dicts, pairs, acts, "patch")
    target_like = ablated_metric(model, dicts, pairs, [], own, metric, acts.starts)
    assert target_like.shape == (6,)
    with pytest.raises(CircuitSAEError, match="ablation must be one of"):
        make_ablation(dicts, pairs, acts, "zero")


def test_the_exact_check_samples_near_zero_nodes_and_reports_per_group(built):
    model, dicts, pairs, circuit, effects, acts = built
    scores = effects.node_scores()
    kept = circuit.members()
    sample = sample_nodes(scores, kept, 20, seed=0)
    assert len(sample) == 20 and not set(sample) & set(kept)
    lowest = sorted((n for n in scores if n not in set(kept)), key=lambda n: abs(scores[n]))[: len(scores) // 5]
    assert set(sample) & set(lowest)  # the band of estimates near zero is sampled
    report = check_circuit(circuit, model, dicts, pairs, {"atp": effects}, acts, n_nodes=20, n_edges=6)
    stats = report.nodes["atp"]
    assert stats["all"].count == len(kept) + 20
    assert {"error nodes"} <= set(stats) and any(g.startswith("kind:") for g in stats)
    assert any(g.startswith("band:") for g in stats)
    assert -1 <= stats["all"].spearman <= 1 and 0 <= stats["all"].sign_agreement <= 1
    assert 0 <= stats["all"].false_negative_rate <= 1
    assert all("exact" in circuit.nodes[str(n)] for n in kept)
    assert report.edges["atp"].count == min(6, circuit.number_of_edges())
    json.dumps(report.to_json())


def test_error_statistics_on_known_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    s = ErrorStats.of([1.0, -2.0, 0.0, 4.0], [1.0, 2.0, 0.5, 2.0], kept=[True, True, False, True])
    assert s.count == 4 and s.sign_agreement == pytest.approx(2 / 4)  # 0.0 vs 0.5 and -2 vs 2 disagree
    assert s.median_relative_error == pytest.approx(1.0)  # errors 0, 2, 1, 1 relative to 1, 2, 0.5, 2
    assert s.false_negative_rate == 0.0  # the top 5% (one node: exact 2.0, the first of them) is kept


def test_neuron_circuits_use_the_identity_dictionary(tiny_llama):
    d = sites.d_model(tiny_llama)
    dicts = {s: IdentityDictionary(d) for s in ("resid.0", "resid.1")}
    for s, x in dicts.items():
        x.meta = {"site": s, "first_position": 1}
    pairs = make_ioi(tiny_llama, n=4, seed=3)
    circuit, effects, acts = feature_circuit(tiny_llama, dicts, pairs, max_nodes=8)
    assert all(float(effects.errors[s].abs().max()) == 0 for s in acts.sites)  # a lossless basis has no error


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")
def test_the_drawing_has_one_rank_per_layer_error_diamonds_and_a_legend(built, tmp_path):
    from circuitsae.viz.circuit import render

    model, dicts, pairs, circuit, effects, acts = built
    paths = render(circuit, tmp_path / "circuit", max_nodes=10)
    svg = (tmp_path / "circuit.svg").read_text()
    dot = (tmp_path / "circuit.dot").read_text()
    assert "diamond" in dot or not any(circuit.nodes[v]["error"] for v in circuit.graph)
    assert "legend" in svg and "metric (logit_diff)" in svg
    assert set(paths) == {"dot", "json", "svg", "png"}
    assert FeatureCircuit.from_json(json.loads((tmp_path / "circuit.json").read_text())).number_of_nodes() == 13


def test_the_circuit_command_writes_the_circuit_its_curves_and_its_check(tiny_llama, tmp_path, capsys):
    """``circuitsae circuit`` on saved TopK dictionaries at every site of the tiny model, end to end."""
    from circuitsae.commands.cli import main

    torch.manual_seed(0)
    d = sites.d_model(tiny_llama)
    saes = tmp_path / "saes"
    for s in sites.resolve(tiny_llama, ["all"]):
        sae = TopKSAE(d, 64, k=8)
        sae.meta = {"site": str(s), "model": "tiny-llama", "first_position": 1}
        sae.save(saes / f"{s}-topk")
    out = tmp_path / "circ"
    argv = ["circuit", "--dictionaries", str(saes), "--model", "tiny-llama", "--model-dtype", "float32",
            "--prompts", "4", "--heldout-prompts", "4", "--max-nodes", "8", "--check", "--check-nodes", "10",
            "--check-edges", "4", "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "feature circuit of tiny-llama" in printed and "atp vs exact on" in printed
    for name in ("circuit.json", "circuit.svg", "circuit.png", "faithfulness.png", "faithfulness.json",
                 "estimator_error.json"):  # fmt: skip
        assert (out / name).is_file(), name
    curves = json.loads((out / "faithfulness.json").read_text())
    assert set(curves) == {"selection prompts", "selection prompts, no error nodes", "held-out prompts"}
    circuit = FeatureCircuit.from_json(json.loads((out / "circuit.json").read_text()))
    assert all("exact" in circuit.nodes[v] for v in circuit.graph if v != "logits")
