"""Whole-model node effects (circuitsae.circuits.effects): known answers on the tiny model.

Every site of tiny-llama gets a random TopK dictionary (so the error terms are large and matter); the IOI
pairs come from the real generator on the tiny model's tokenizer.
"""

from __future__ import annotations

import pytest
import torch

import circuitsae
from circuitsae import sites
from circuitsae.circuits import effects as E
from circuitsae.dictionaries import TopKSAE
from circuitsae.errors import CircuitSAEError
from circuitsae.interventions.splice import logits_of
from circuitsae.models import dtype_name
from circuitsae.tasks.ioi import make_ioi


def _dictionaries(model, width=96, k=8, seed=0):
    torch.manual_seed(seed)
    d = sites.d_model(model)
    out = {}
    for s in sites.resolve(model, ["all"]):
        sae = TopKSAE(d, width, k=k)
        sae.meta = {"site": str(s), "first_position": 1}
        out[str(s)] = sae.to(getattr(torch, dtype_name(model)))
    return out


@pytest.fixture(scope="module")
def setup(tiny_llama):
    pairs = make_ioi(tiny_llama, n=6, seed=1)
    dicts = _dictionaries(tiny_llama)
    atp, acts = E.node_effects(tiny_llama, dicts, pairs, method="atp")
    return tiny_llama, pairs, dicts, atp, acts


def _patch_site(model, pairs, acts, metric, site, scale=1.0):
    """m(base with the whole site moved to the target's activation) − m(base), per prompt."""
    start = acts.starts[site]
    delta = (acts.target[site] - acts.base[site]) * acts.mask[site][..., None] * scale
    with torch.no_grad(), model.trace(pairs.base):
        x = sites.read(model, site)
        x[:] = x + delta.to(x.dtype)
        logits = logits_of(model).save()
    assert start >= 0
    return metric(logits, torch.arange(len(pairs))) - acts.base_metric


def test_a_sites_feature_and_error_estimates_add_up_to_the_gradient_times_its_change(setup):
    model, pairs, dicts, atp, acts = setup
    for s in acts.sites:
        both = atp.features[s].sum(-1) + atp.errors[s]
        whole = (acts.grads[s] * (acts.target[s] - acts.base[s])).sum(-1) * acts.mask[s]
        torch.testing.assert_close(both, whole, rtol=1e-4, atol=1e-6)
    assert any(float(atp.errors[s].abs().max()) > 0 for s in acts.sites)  # error nodes carry effect
    # non-nodes hold nothing: the BOS position and the padding
    for s in acts.sites:
        assert float(atp.features[s][:, 0].abs().max()) == 0 and float(atp.errors[s][:, 0].abs().max()) == 0
        pad = ~acts.mask[s]
        assert float(atp.errors[s][pad].abs().max()) == 0


def test_error_nodes_make_the_spliced_model_equal_the_model(setup):
    model, pairs, dicts, atp, acts = setup
    from circuitsae.interventions.splice import run_spliced

    clean = run_spliced(model, pairs.base, {})
    spliced = run_spliced(model, pairs.base, dicts, keep_error=True)
    lossy = run_spliced(model, pairs.base, dicts)
    torch.testing.assert_close(spliced, clean, rtol=1e-4, atol=1e-4)
    assert float((lossy - clean).abs().max()) > 1e-2  # the random dictionaries alone are far from the model
    # and a node's exact effect is zero when the target equals the base
    same = E.exact_effects(model, dicts, pairs, [E.Node("resid.1", None)], acts.__class__(
        acts.sites, acts.base, acts.base, acts.starts, acts.mask, acts.base_metric))  # fmt: skip
    assert float(same.abs().max()) < 1e-5


def test_exact_effects_equal_a_patch_of_the_nodes_change_and_batch_the_same_as_alone(setup):
    model, pairs, dicts, atp, acts = setup
    nodes = [n for n, _ in atp.top(5)] + [E.Node("mlp.2", None, position=3)]
    together = E.exact_effects(model, dicts, pairs, nodes, acts, batch_size=64)
    alone = torch.cat([E.exact_effects(model, dicts, pairs, [n], acts, batch_size=2) for n in nodes])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)
    # an error node patched at every position plus all the site's features = the whole site's patch only when
    # nothing interacts; the single error node equals a direct nnsight patch of its delta
    metric = E.make_metric(model, pairs)
    n = nodes[-1]
    delta = E.node_delta(acts, dicts[n.site], n)
    with torch.no_grad(), model.trace(pairs.base):
        x = sites.read(model, n.site)
        x[:] = x + delta.to(x.dtype)
        logits = logits_of(model).save()
    direct = metric(logits, torch.arange(len(pairs))) - acts.base_metric
    torch.testing.assert_close(together[-1], direct, rtol=1e-4, atol=1e-6)


def test_integrated_gradients_tend_to_the_exact_effect_of_patching_the_site_as_steps_grow(setup):
    model, pairs, dicts, atp, acts = setup
    metric = E.make_metric(model, pairs)
    site = "attn.1"
    exact = _patch_site(model, pairs, acts, metric, site)
    gaps = []
    for steps in (1, 4, 32):
        ig, _ = E.node_effects(model, {site: dicts[site]}, pairs, method="ig", steps=steps, activations=None)
        est = ig.features[site].sum((1, 2)) + ig.errors[site].sum(1)
        gaps.append(float((est - exact).abs().max()))
    scale = float(exact.abs().max())
    assert scale > 1e-3
    assert gaps[2] < gaps[1] < gaps[0]
    assert gaps[2] < 0.05 * scale, (gaps, scale)


def test_attribution_equals_the_exact_effect_where_the_model_is_linear_in_the_node():
    """With the final norm's ε huge, RMSNorm is a constant scale: the logits are linear in the last block's
    output, so for nodes at resid.L−1 and mlp.L−1 (nothing non-linear after them) AtP and IG are exact."""
    model = circuitsae.load_model("tiny-llama", dtype="float64")
    norm = model._module.model.norm
    norm.variance_epsilon = 1e10
    pairs = make_ioi(model, n=4, seed=2)
    dicts = _dictionaries(model, seed=3)
    last = sites.n_layers(model) - 1
    linear_sites = [f"mlp.{last}", f"resid.{last}"]
    atp, acts = E.node_effects(model, dicts, pairs, method="atp")
    ig, _ = E.node_effects(model, {s: dicts[s] for s in linear_sites}, pairs, method="ig", steps=3)
    nodes = []
    for s in linear_sites:
        feats = atp.features[s].abs().sum((0, 1))
        nodes += [E.Node(s, int(i)) for i in feats.topk(4).indices] + [E.Node(s, None)]
    exact = E.exact_effects(model, dicts, pairs, nodes, acts)
    for node, ex in zip(nodes, exact):
        est = atp.errors[node.site].sum(1) if node.is_error else atp.features[node.site][..., node.feature].sum(1)
        ig_est = ig.errors[node.site].sum(1) if node.is_error else ig.features[node.site][..., node.feature].sum(1)
        assert float(ex.abs().max()) > 0
        torch.testing.assert_close(est, ex, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(ig_est, ex, rtol=1e-6, atol=1e-12)
    # one block earlier the model is not linear: attention and the MLP bend the estimate
    early = E.Node(f"resid.{last - 2}", None)
    ex = E.exact_effects(model, dicts, pairs, [early], acts)[0]
    est = atp.errors[early.site].sum(1)
    assert float((est - ex).abs().max()) > 1e-6 * float(ex.abs().max())


def test_node_effects_refuse_bad_input_in_one_line(setup):
    model, pairs, dicts, atp, acts = setup
    for call, words in [
        (lambda: E.node_effects(model, dicts, pairs, method="lrp"), "method must be one of"),
        (lambda: E.node_effects(model, dicts, pairs, method="ig", steps=0), "steps >= 1"),
        (lambda: E.node_effects(model, {}, pairs), "at least one site"),
        (lambda: E.node_effects(model, dicts, pairs, metric="loss"), "metric must be one of"),
        (lambda: E.exact_effects(model, dicts, pairs, [E.Node("resid.1", 10_000)], acts), "feature ids"),
    ]:
        with pytest.raises(CircuitSAEError, match=words) as info:
            call()
        assert "\n" not in str(info.value)


def test_node_scores_sum_positions_and_average_prompts(setup):
    model, pairs, dicts, atp, acts = setup
    scores = atp.node_scores()
    node, value = atp.top(1)[0]
    assert scores[node] == value
    per_prompt = atp.errors[node.site] if node.is_error else atp.features[node.site][..., node.feature]
    direct = per_prompt.sum(1).mean()
    assert value == pytest.approx(float(direct))
    assert all(E.Node(s, None) in scores for s in acts.sites)
    assert str(E.Node("resid.1", 5, 3)) == "resid.1/5@3" and str(E.Node("attn.0", None)) == "attn.0/err"


def _linear_model():
    """tiny-llama in float64 with the final norm's ε huge: RMSNorm is then a constant scale, and the logits are
    linear in the last block's output."""
    model = circuitsae.load_model("tiny-llama", dtype="float64")
    model._module.model.norm.variance_epsilon = 1e10
    return model


def test_edges_equal_their_exact_effects_where_the_local_map_and_the_rest_are_linear():
    """Neuron dictionaries at the last two blocks' sites of the linear model: resid.L−1 → resid.L is the
    identity with attn.L and mlp.L held, and everything after resid.L is linear, so ê(u→d) is exact; a neuron
    feeds only itself across that edge."""
    from circuitsae.dictionaries import IdentityDictionary

    model = _linear_model()
    pairs = make_ioi(model, n=4, seed=2)
    last = sites.n_layers(model) - 1
    d = sites.d_model(model)
    dicts = {}
    for s in (f"resid.{last - 1}", f"attn.{last}", f"mlp.{last}", f"resid.{last}"):
        dicts[s] = IdentityDictionary(d).double()
        dicts[s].meta = {"site": s, "first_position": 1}
    atp, acts = E.node_effects(model, dicts, pairs)
    nodes = [n for n, _ in atp.top(16) if not n.is_error]
    edges = E.edge_effects(model, dicts, pairs, nodes, acts)
    scores = edges.scores()
    resid_edges = [(u, v) for (u, v) in scores if u.site == f"resid.{last - 1}" and v.site == f"resid.{last}"]
    assert resid_edges and all(
        scores[(u, v)] == 0 for (u, v) in resid_edges if u.feature != v.feature
    )  # the identity map joins a neuron to itself only
    checked = sorted(scores, key=lambda k: -abs(scores[k]))[:10]
    assert any(v == E.LOGITS for _, v in checked) and any(v != E.LOGITS for _, v in checked)
    exact = E.exact_edge_effects(model, dicts, pairs, checked, acts)
    for k, ex in zip(checked, exact):
        assert float(ex.abs().max()) > 0
        torch.testing.assert_close(edges.edges[k], ex, rtol=1e-5, atol=1e-15)


def test_edge_estimates_approach_exact_effects_for_small_changes_in_a_nonlinear_model():
    """ReLU dictionaries everywhere on the ordinary model (continuous codes: TopK's jumps, when a unit enters the
    top k, are no small change), the target moved a thousandth of the way from the base: the estimates of the
    largest edges are within 10% of the exact local patches (tiny-llama's norms compute in float32, which bounds
    how small the change can usefully be)."""
    import dataclasses

    model = circuitsae.load_model("tiny-llama", dtype="float64")
    pairs = make_ioi(model, n=4, seed=2)
    torch.manual_seed(0)
    dicts = {}
    for s in sites.resolve(model, ["all"]):
        dicts[str(s)] = circuitsae.ReluSAE(sites.d_model(model), 96).double()
        dicts[str(s)].meta = {"site": str(s), "first_position": 1}
    _, acts = E.node_effects(model, dicts, pairs)
    near = dataclasses.replace(
        acts, target={s: acts.base[s] + 1e-3 * (acts.target[s] - acts.base[s]) for s in acts.sites}
    )  # noqa: E501
    atp, _ = E.node_effects(model, dicts, pairs, activations=near)
    nodes = [n for n, _ in atp.top(12)]
    edges = E.edge_effects(model, dicts, pairs, nodes, near)
    scores = edges.scores()
    checked = sorted(scores, key=lambda k: -abs(scores[k]))[:8]
    assert {u.site.split(".")[0] for u, _ in checked} - {"logits"}
    exact = E.exact_edge_effects(model, dicts, pairs, checked, near).mean(1)
    for k, ex in zip(checked, exact):
        assert scores[k] == pytest.approx(float(ex), rel=0.1), k


def test_effects_by_token_role_partition_the_positions(setup):
    model, pairs, dicts, atp, acts = setup
    roles = atp.by_role(pairs)
    assert set(roles) == {"IO", "S1", "S2", "END", "other"}
    total = atp.node_scores()
    for node, value in list(total.items())[:50]:
        assert sum(r.get(node, 0.0) for r in roles.values()) == pytest.approx(value, rel=1e-5, abs=1e-9)
    with pytest.raises(CircuitSAEError, match="token roles need IOI"):
        from circuitsae.tasks.pairs import PromptPairs

        atp.by_role(PromptPairs(pairs.base, pairs.target, pairs.lengths))


def _edges_of(dicts, acts, atp):
    top = {s: max(range(atp.features[s].shape[-1]), key=lambda i: float(atp.features[s][..., i].abs().sum()))
           for s in acts.sites}  # fmt: skip
    feat = {s: E.Node(s, top[s]) for s in acts.sites}
    err = {s: E.Node(s, None) for s in acts.sites}
    return [
        (feat["resid.0"], feat["attn.1"]), (err["resid.0"], feat["mlp.1"]), (feat["attn.1"], err["resid.1"]),
        (feat["mlp.1"], feat["resid.1"]), (feat["resid.0"], feat["resid.1"]), (err["attn.1"], feat["mlp.1"]),
        (feat["resid.0"], err["resid.2"]),  # across blocks, with every site between held at base
        (feat[acts.sites[-1]], E.LOGITS),
    ]  # fmt: skip


def test_running_only_the_blocks_after_a_site_equals_whole_model_runs(setup):
    model, pairs, dicts, atp, acts = setup
    nodes = [E.Node(s, f) for s in ("attn.0", "mlp.1", "resid.2", acts.sites[-1]) for f in (None, 3)]
    fast = E.exact_effects(model, dicts, pairs, nodes, acts, replay=True)
    whole = E.exact_effects(model, dicts, pairs, nodes, acts, replay=False)
    assert float(whole.abs().max()) > 1e-3
    torch.testing.assert_close(fast, whole, rtol=1e-4, atol=1e-5)
    edges = _edges_of(dicts, acts, atp)
    fast = E.exact_edge_effects(model, dicts, pairs, edges, acts, replay=True)
    whole = E.exact_edge_effects(model, dicts, pairs, edges, acts, replay=False)
    assert float(whole.abs().max()) > 1e-3
    torch.testing.assert_close(fast, whole, rtol=1e-4, atol=1e-5)
    some = {s: dicts[s] for s in ("attn.0", "mlp.1", "resid.2")}
    ig_fast, _ = E.node_effects(model, some, pairs, method="ig", steps=3, replay=True)
    ig_whole, _ = E.node_effects(model, some, pairs, method="ig", steps=3, replay=False)
    for s in some:
        torch.testing.assert_close(ig_fast.features[s], ig_whole.features[s], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(ig_fast.errors[s], ig_whole.errors[s], rtol=1e-3, atol=1e-5)


def test_block_inputs_are_recorded_where_no_resid_site_holds_them(setup):
    model, pairs, dicts, atp, acts = setup
    some = {s: dicts[s] for s in ("attn.1", "mlp.1", "mlp.2")}
    _, part = E.node_effects(model, some, pairs, method="atp")
    assert sorted(part.inputs) == [1, 2]
    torch.testing.assert_close(part.block_input(1), acts.base["resid.0"], rtol=1e-5, atol=1e-5)
    assert "resid.1" not in part.base
    nodes = [E.Node("attn.1", None), E.Node("mlp.2", 5)]
    fast = E.exact_effects(model, some, pairs, nodes, part, replay=True)
    whole = E.exact_effects(model, some, pairs, nodes, part, replay=False)
    torch.testing.assert_close(fast, whole, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-gpt2"])
def test_replay_matches_whole_runs_on_other_families(name, tiny_models):
    model = tiny_models.get(name) or circuitsae.load_model(name, dtype="float32")
    pairs = make_ioi(model, n=4, seed=2)
    dicts = _dictionaries(model, width=64, k=4)
    atp, acts = E.node_effects(model, dicts, pairs, method="atp")
    nodes = [n for n, _ in atp.top(6)]
    fast = E.exact_effects(model, dicts, pairs, nodes, acts, replay=True)
    whole = E.exact_effects(model, dicts, pairs, nodes, acts, replay=False)
    torch.testing.assert_close(fast, whole, rtol=1e-4, atol=1e-5)
    assert float(whole.abs().max()) > 1e-4
