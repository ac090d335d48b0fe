"""Causal trees (REFERENCE §5) and their rendering, on tiny-llama with hand-wired dictionaries."""

import json
import re
import xml.etree.ElementTree as ET

import networkx as nx
import pytest
import torch

import circuitsae
from circuitsae import sites
from circuitsae.circuits.features import ablate, site_hook
from circuitsae.circuits.trees import CausalTree, causal_tree, record
from circuitsae.commands.cli import main
from circuitsae.errors import CircuitSAEError
from circuitsae.interventions.splice import check_dictionary
from circuitsae.viz.render import MISSING_DOT, TARGET_FILL, render, to_dot


def _copy(d, **meta):
    out = circuitsae.ReluSAE(d.d, d.d_dict)
    out.load_state_dict(d.state_dict())
    out.meta = {**d.meta, **meta}
    return out


@pytest.fixture(scope="module")
def tree(tiny_llama, wired):
    store, dicts = wired
    return causal_tree(tiny_llama, dicts, ("resid.2", 7), depth=2, branching=3, contexts=8, progress=False)


def test_the_wired_edge_comes_first_with_a_positive_effect(tree):
    parents = sorted(tree.graph.in_edges("resid.1:3", data=True), key=lambda e: -e[2]["effect"])
    assert parents[0][0] == "resid.0:5" and parents[0][2]["effect"] > 0
    assert parents[0][2]["effect"] > 3 * parents[1][2]["effect"]
    top = max(tree.graph.in_edges("resid.2:7", data=True), key=lambda e: e[2]["effect"])
    assert top[0] == "resid.1:3" and top[2]["relative"] > 0.5
    for u, v, e in tree.edges(data=True):  # parents are upstream, effects positive, relative = effect / mean
        assert sites.Site.parse(tree.nodes[u]["site"]).layer + 1 == sites.Site.parse(tree.nodes[v]["site"]).layer
        assert e["effect"] > 0
        assert e["relative"] == pytest.approx(e["effect"] / tree.nodes[v]["mean_activation"])
    assert tree.graph.in_degree("resid.1:3") <= 3
    assert tree.target == "resid.2:7" and tree.contexts == 8 and tree.seconds > 0
    assert set(tree.engines.values()) == {"downstream+at_p"}
    for _, n in tree.nodes(data=True):
        assert {"site", "layer", "feature", "label", "max_activation", "mean_activation"} <= set(n)


def test_effects_equal_full_model_ablations(tiny_llama, wired):
    """The target's mean decrease, recomputed with the whole model and a forward hook per context."""
    store, dicts = wired
    g = causal_tree(tiny_llama, dicts, ("resid.1", 3), depth=1, branching=2, contexts=5, progress=False)
    hf = tiny_llama._module
    acts = dicts["resid.1"].encode(store.activations("resid.1", "train").to(hf.device))[:, 3].cpu()
    best = acts.view(-1, 15).max(-1)
    ok = (best.values >= acts.max() / 2).nonzero().flatten()
    chosen = ok[torch.randperm(len(ok), generator=torch.Generator().manual_seed(0))[:5]].sort().values
    for u, _, e in g.graph.in_edges("resid.1:3", data=True):
        i, total = g.nodes[u]["feature"], 0.0
        for c in chosen.tolist():
            p = 1 + int(best.indices[c])
            ids = store.tokens("train")[c : c + 1, : p + 1].to(hf.device)
            clean = dicts["resid.1"].encode(record(hf, ids, ["resid.1"])["resid.1"])[0, p, 3]
            with site_hook(tiny_llama, "resid.0", lambda x: ablate(dicts["resid.0"], x, i, start=1)):
                ablated = dicts["resid.1"].encode(record(hf, ids, ["resid.1"])["resid.1"])[0, p, 3]
            total += float((clean - ablated).detach())
        assert e["effect"] == pytest.approx(total / 5, rel=1e-4, abs=1e-6)


def test_hook_engine_gives_the_same_tree(tiny_llama, wired, tree, monkeypatch):
    store, dicts = wired
    monkeypatch.setattr("circuitsae.circuits.trees.Blocks.supports", staticmethod(lambda m, s: False))
    g = causal_tree(tiny_llama, dicts, ("resid.2", 7), depth=2, branching=3, contexts=8, progress=False)
    assert set(g.engines.values()) == {"hook"}
    assert set(g.edges) == set(tree.edges)
    for u, v, e in g.edges(data=True):
        assert e["effect"] == pytest.approx(tree.edges[u, v]["effect"], rel=1e-4, abs=1e-7)


def test_less_than_rank_one_ablation_removes_exactly_c_f(tiny_llama, wired):
    store, dicts = wired
    d, i = dicts["resid.0"], 5
    hf = tiny_llama._module
    ids = store.tokens("train")[:3].to(hf.device)
    d.to(hf.device)
    x = record(hf, ids, ["resid.0"])["resid.0"]
    seen = {}
    with site_hook(tiny_llama, "resid.0", lambda out: ablate(d, out, i, start=1)):
        h = sites.module(hf, "resid.0").register_forward_hook(lambda m, inp, out: seen.update(x=out))
        try:
            hf(input_ids=ids)
        finally:
            h.remove()
    c = d.encode(x)[..., i]
    fires = (c > 0) & (torch.arange(16, device=c.device) >= 1)
    want = torch.where(fires[..., None], x - c[..., None] * d.W_dec[i], x)
    torch.testing.assert_close(seen["x"], want, rtol=0, atol=1e-6)
    assert torch.equal(seen["x"][~fires], x[~fires]) and fires.sum() > 10
    assert d.encode(seen["x"])[..., i][fires].abs().max() < 1e-4  # the feature is just off


def test_fewer_contexts_in_range_are_used_and_reported(tiny_llama, wired):
    store, dicts = wired
    with pytest.warns(UserWarning, match=r"only \d+ contexts have resid.1:3 in \[M/2, M\]"):
        g = causal_tree(tiny_llama, dicts, ("resid.1", 3), depth=1, contexts=1000, progress=False)
    assert g.contexts == g.contexts_in_range < 1000 and g.contexts_requested == 1000


def test_bad_input_is_one_line(tiny_llama, wired):
    store, dicts = wired
    silent = _copy(dicts["resid.1"])
    with torch.no_grad():
        silent.b_enc[3] = -100.0
    cases = [
        ({**dicts, "resid.1": silent}, ("resid.1", 3), r"never fires: density 0 over 405 train rows"),
        ({**dicts, "resid.0": _copy(dicts["resid.0"], model="other")}, ("resid.1", 3), "different models"),
        ({"resid.1": dicts["resid.1"], "resid.0": dicts["resid.0"]}, ("resid.1", 3), "forward order"),
        ({"resid.1": dicts["resid.1"]}, ("resid.1", 3), "no dictionary upstream of resid.1"),
        ({"resid.0": dicts["resid.0"]}, ("resid.1", 3), "no dictionary at the target's site resid.1"),
        ({"resid.0": dicts["resid.1"], "resid.1": dicts["resid.1"]}, ("resid.1", 3), "trained on site resid.1"),
        (dicts, ("resid.1", 99), "feature 99 does not exist"),
    ]
    for mapping, target, match in cases:
        with pytest.raises(CircuitSAEError, match=match) as e:
            causal_tree(tiny_llama, mapping, target, depth=1, contexts=4, progress=False)
        assert "\n" not in str(e.value)


def test_paper_mode_studies_each_parent_on_its_own_contexts(tiny_llama, wired, tree):
    """A parent's subtree is the tree it would have as a root: its own M, its own contexts, q at its own p."""
    store, dicts = wired
    assert tree.mode == "paper"
    for _, a in tree.nodes(data=True):
        with torch.no_grad():
            d = dicts[a["site"]]
            acts = d.encode(store.activations(a["site"], "train").to(d.W_dec.device))[:, a["feature"]].cpu()
        assert a["context_max"] == pytest.approx(float(acts.max()), rel=1e-5) and 1 <= a["contexts"] <= 8
    for parent in [u for u, _ in tree.graph.in_edges("resid.2:7")]:
        site, feature = parent.split(":")
        alone = causal_tree(tiny_llama, dicts, (site, int(feature)), depth=1, branching=3, contexts=8, progress=False)
        assert alone.nodes[parent]["mean_activation"] == pytest.approx(tree.nodes[parent]["mean_activation"], rel=1e-6)
        assert set(alone.graph.in_edges(parent)) == set(tree.graph.in_edges(parent))
        for u, v in alone.graph.in_edges(parent):
            assert tree.edges[u, v]["effect"] == pytest.approx(alone.edges[u, v]["effect"], rel=1e-6)


def test_shared_mode_reuses_the_root_contexts_and_is_named(tiny_llama, wired, tree):
    store, dicts = wired
    g = causal_tree(tiny_llama, dicts, ("resid.2", 7), depth=2, branching=3, contexts=8, mode="shared", progress=False)
    assert g.mode == "shared" and "contexts" not in g.nodes["resid.1:3"]
    # the first level is the same quantity in both modes
    assert set(g.graph.in_edges("resid.2:7")) == set(tree.graph.in_edges("resid.2:7"))
    for u, v in g.graph.in_edges("resid.2:7"):
        assert g.edges[u, v]["effect"] == pytest.approx(tree.edges[u, v]["effect"], rel=1e-6)
    top = max(g.graph.in_edges("resid.1:3", data=True), key=lambda e: e[2]["effect"])
    assert top[0] == "resid.0:5"
    with pytest.raises(CircuitSAEError, match="mode must be 'paper'"):
        causal_tree(tiny_llama, dicts, ("resid.2", 7), mode="recursive", progress=False)
    partial = {"resid.1": dicts["resid.1"], "resid.2": dicts["resid.2"]}
    with pytest.raises(CircuitSAEError, match="lacks resid.0; harvest those sites too, or use mode='shared'"):
        causal_tree(tiny_llama, {"resid.0": _copy(dicts["resid.0"]), **partial}, ("resid.2", 7), depth=2,
                    store=_store_without(store, "resid.0"), progress=False)  # fmt: skip


def test_an_ablation_that_changes_nothing_has_an_effect_of_exactly_zero(tiny_llama, wired, monkeypatch):
    """Clean and ablated q come from one computation: a firing feature with a zero direction moves nothing."""
    from circuitsae.circuits import trees

    store, dicts = wired
    src = _copy(dicts["resid.0"])
    with torch.no_grad():
        src.W_dec[9] = 0.0  # tied: its code is ReLU(b_enc) = 1 everywhere, its ablation subtracts 1 · 0
        src.b_enc[9] = 1.0
    chain = {"resid.0": src, "resid.1": dicts["resid.1"]}
    for s, d in chain.items():
        check_dictionary(tiny_llama, s, d)  # onto the site's device, as causal_tree does
    hf = tiny_llama._module
    with torch.no_grad():
        d1 = dicts["resid.1"]
        acts = d1.encode(store.activations("resid.1", "train").to(d1.W_dec.device))[:, 3].cpu()
    picked, _ = trees._pick_contexts(acts, store, 6, "train", 0)
    ctx = trees._contexts(tiny_llama, hf, chain, store, picked, "train", ["resid.0", "resid.1"])
    got = {}
    for engine in ("at_p", "window", "hook"):
        if engine == "hook":
            monkeypatch.setattr("circuitsae.circuits.trees.Blocks.supports", staticmethod(lambda m, s: False))
        seg = trees._Segment(tiny_llama, "resid.0", "resid.1")
        if engine == "window":
            seg.at_p = None
        assert (seg.at_p is not None) == (engine == "at_p") and seg.fast == (engine != "hook")
        for at_p in (True, False):
            with torch.no_grad():
                effects, cands = trees._effects(seg, chain, "resid.0", "resid.1", [3], ctx, at_p, 8192, False)
            k = (cands == 9).nonzero().flatten()
            assert len(k) == 1 and float(effects[k[0], 0]) == 0.0, (engine, at_p)
            assert effects.abs().max() > 0  # the others do move it
            got[engine, at_p] = effects
    # the three computations agree (the last-position one only computes q at p)
    for engine in ("window", "hook"):
        torch.testing.assert_close(got["at_p", True], got[engine, True], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["window", False], got["hook", False], rtol=1e-4, atol=1e-5)


def _store_without(store, site):
    """A copy of the wired store's folder that lacks one site (its meta says so)."""
    import shutil

    root = store.root.parent / f"without-{site}"
    if not root.exists():
        shutil.copytree(store.root, root)
        meta = json.loads((root / "meta.json").read_text())
        meta["sites"] = [s for s in meta["sites"] if s != site]
        (root / "meta.json").write_text(json.dumps(meta))
    return circuitsae.ActivationStore(str(root))


def test_dot_has_ranks_nodes_and_widths_ordered_like_effects(tree):
    src = to_dot(tree).source
    for node in tree.nodes:  # DOT id site_feature (a colon would name a port), label site:feature
        assert re.search(rf"^\s*\"?{re.escape(node.replace(':', '_'))}\"? \[label=\"{re.escape(node)}", src, re.M)
    widths = {}
    for u, v in tree.edges:
        m = re.search(
            rf"\"?{re.escape(u.replace(':', '_'))}\"? -> \"?{re.escape(v.replace(':', '_'))}\"? \[.*penwidth=([\d.]+)",
            src,
        )
        assert m, (u, v)
        widths[u, v] = float(m.group(1))
    order = sorted(widths, key=lambda k: tree.edges[k]["effect"])
    assert [widths[k] for k in order] == sorted(widths.values())
    assert src.count("rank=same") == 3 and "legend" in src


def test_render_writes_svg_png_dot_and_json(tree, tmp_path):
    paths = render(tree, tmp_path / "tree")
    assert set(paths) == {"dot", "json", "svg", "png"}
    root = ET.parse(paths["svg"]).getroot()
    assert root.tag.endswith("svg")
    text = " ".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
    assert "resid.2:7" in text and "resid.0:5" in text
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    back = nx.node_link_graph(json.load(open(paths["json"])), edges="edges")
    assert set(back.edges) == set(tree.edges) and back.graph["target"] == "resid.2:7"


def test_the_tree_round_trips_through_json(tree):
    data = json.loads(json.dumps(tree.to_json()))
    back = CausalTree.from_json(data)
    assert back.to_json() == tree.to_json()
    assert back.target == "resid.2:7" and back.mode == "paper" and back.engines == tree.engines
    assert sorted(back.edges(data=True)) == sorted(tree.edges(data=True))
    assert dict(back.nodes(data=True)) == dict(tree.nodes(data=True))
    # node-link data as networkx writes it, with the run's settings as the graph's attributes
    plain = nx.node_link_graph(data, edges="edges")
    assert plain.graph["sites"] == tree.sites and set(plain.edges) == set(tree.edges)
    older = {**{k: v for k, v in data.items() if k != "edges"}, "links": data["edges"]}  # networkx < 3.4's key
    assert CausalTree.from_json(older).to_json() == data


def test_render_writes_the_json_the_bare_graph_gave(tree, tmp_path):
    """stem.json is what rendering the tree as a networkx graph with its settings as attributes wrote."""
    old = tree.graph.copy()
    old.graph.update(tree.to_json()["graph"])
    paths = render(tree, tmp_path / "t")
    assert open(paths["json"]).read() == json.dumps(nx.node_link_data(old, edges="edges"), indent=1)
    assert CausalTree.from_graph(old).to_json() == tree.to_json() and not tree.graph.graph
    assert to_dot(old).source == to_dot(tree).source  # a graph with attributes draws as its tree


def test_prune_keeps_the_target_and_the_strongest_nodes_connected_to_it(tree):
    small = tree.prune(max_nodes=3)
    assert small.target == tree.target and small.number_of_nodes() == 3 and tree.target in small
    strongest = max(tree.edges(data=True), key=lambda e: e[2]["effect"])
    assert (strongest[0], strongest[1]) in small.edges
    for v in small.nodes:
        assert v == tree.target or nx.has_path(small.graph, v, tree.target)
    cut = tree.prune(min_effect=float("inf"))
    assert list(cut.nodes) == [tree.target] and tree.number_of_edges() > 0  # the tree itself is unchanged
    assert tree.prune().to_json() == tree.to_json()


def test_the_report_finds_the_target_by_the_fill_render_gives_it(tree):
    from circuitsae.viz import report

    src = to_dot(tree).source
    node = re.escape(tree.target.replace(":", "_"))
    assert re.search(rf"^\s*\"?{node}\"? \[.*fillcolor=\"{re.escape(TARGET_FILL)}\"", src, re.M)
    assert src.count(TARGET_FILL) == 1 and f'[fill="{TARGET_FILL}"]' in report._TREE_JS


def test_render_caps_nodes(tree):
    small = to_dot(tree, max_nodes=3).source
    assert small.count("->") == 2 and "weaker nodes not drawn" in small


def test_missing_dot_binary_still_writes_dot_and_json(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.warns(UserWarning, match=re.escape(MISSING_DOT)):
        paths = render(tree, tmp_path / "t")
    assert set(paths) == {"dot", "json"}
    assert (tmp_path / "t.dot").is_file() and (tmp_path / "t.json").is_file() and not (tmp_path / "t.svg").exists()


def test_tree_cli(tiny_llama, wired, tmp_path, capsys, device):
    store, dicts = wired
    for site, d in dicts.items():
        d.save(tmp_path / "saes" / f"{site}-relu-c1")
    out = tmp_path / "tree" / "t"
    argv = ["tree", "resid.2:7", "--dictionaries", str(tmp_path / "saes"), "--depth", "1", "--contexts", "1000"]
    assert main([*argv, "--out", str(out), "--device", device, "--model-dtype", "float32"]) == 0
    printed = capsys.readouterr()
    assert "causal tree of resid.2:7" in printed.out and "resid.1:3" in printed.out
    assert re.search(r"(^|\r)circuitsae: warning: only \d+ contexts have resid.2:7 in \[M/2, M\]", printed.err, re.M)
    assert all((tmp_path / "tree" / f"t.{ext}").is_file() for ext in ("dot", "svg", "png", "json"))
    _copy(dicts["resid.1"]).save(tmp_path / "saes" / "resid.1-relu-c2")
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "2 dictionaries at resid.1" in err and "--arch/--coefficient" in err and len(err.splitlines()) == 1
    assert main(["tree", "resid.2-7", "--dictionaries", str(tmp_path / "saes")]) == 2
    assert "is not SITE:FEATURE" in capsys.readouterr().err
    assert main(["tree", "resid.2:7", "--dictionaries", str(tmp_path / "saes"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a folder, but it is the stem of the files written" in err and len(err.splitlines()) == 1
    assert main(["tree", "resid.2:7", "--dictionaries", str(tmp_path / "saes"), "--mode", "deep"]) == 2
    err = capsys.readouterr().err.strip()
    assert "argument --mode: invalid choice: 'deep'" in err and len(err.splitlines()) == 1
    (tmp_path / "saes" / "resid.1-relu-c2").rename(tmp_path / "spare")
    shared = [*argv[:-1], "8", "--mode", "shared", "--depth", "2", "--out", str(out), "--device", device]
    assert main(shared) == 0
    assert json.loads((tmp_path / "tree" / "t.json").read_text())["graph"]["mode"] == "shared"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma3"])
def test_last_position_block_matches_the_block_path_or_is_not_used(name):
    """The last-position path exists for Llama-style blocks and passes its own check against the block path."""
    import warnings

    from circuitsae.circuits import trees

    lm = circuitsae.load_model(name, device="cpu", dtype="float32")
    ids = torch.randint(3, 200, (3, 40), generator=torch.Generator().manual_seed(0))
    xs = record(lm._module, ids, ["resid.0", "resid.1"])
    seg = trees._Segment(lm, "resid.0", "resid.1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seg.check(xs["resid.0"], xs["resid.1"], ids, [40, 31, 17])
    assert (seg.at_p is not None) == (name != "tiny-gemma3")


def test_a_topk_sae_that_keeps_every_feature_gives_the_relu_tree(tiny_llama, wired):
    """TopK with k = d_sae, W_enc = W_dec and b_dec = 0 computes ReLU(W x + b): the tied ReLU SAE. Its tree (through
    the TopK class's own encode, ablation and splice) must be the ReLU SAE's, edge for edge."""
    _, dicts = wired

    def as_topk(d):
        t = circuitsae.TopKSAE(d.d, d.d_dict, k=d.d_dict)
        with torch.no_grad():
            t.W_enc.copy_(d.W_dec)
            t.W_dec.copy_(d.W_dec)
            t.b_enc.copy_(d.b_enc)
            t.b_dec.zero_()
        t.meta = dict(d.meta)
        return t

    topk = {site: as_topk(d) for site, d in dicts.items()}
    kw = dict(depth=1, branching=2, contexts=5, progress=False)
    a = causal_tree(tiny_llama, dicts, ("resid.1", 3), **kw)
    b = causal_tree(tiny_llama, topk, ("resid.1", 3), **kw)
    assert a.number_of_edges() >= 2
    assert sorted(a.nodes) == sorted(b.nodes) and sorted(a.edges) == sorted(b.edges)
    for u, v in a.edges:
        assert b.edges[u, v]["effect"] == pytest.approx(a.edges[u, v]["effect"], rel=1e-4, abs=1e-6)
