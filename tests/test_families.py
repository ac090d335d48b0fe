"""Every supported model family, on its tiny random model: sites, harvest, splicing, both evaluators, trees, IOI.

The sliding-window families (Mistral, Qwen2 from layer 2, Gemma 2 and 3 on alternate layers) have a window of 8
tokens, shorter than the prompts here, so masking that ignored the window would show. Gemma 2 caps its logits,
Gemma 3 has a rotary table per kind of layer, and both add post-normed sub-block outputs to the residual.
"""

import warnings

import pytest
import torch

import circuitsae
from circuitsae import sites
from circuitsae.circuits.acdc import acdc
from circuitsae.circuits.trees import _Segment, record
from circuitsae.interventions.patching import feature_deltas
from circuitsae.interventions.replay import Blocks, make_evaluator
from circuitsae.models import TINY_FAMILIES

FAMILIES = [f"tiny-{f}" for f in TINY_FAMILIES]
FAST = {"tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma2", "tiny-gemma3"}


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request, device):
    return circuitsae.load_model(request.param, device=device, dtype="float64")


@pytest.fixture(scope="module")
def ioi(lm):
    return circuitsae.make_ioi(lm, n=4, seed=1)


def _sae(lm, site):
    torch.manual_seed(0)
    d = circuitsae.ReluSAE(sites.d_model(lm), 48, tied=False, decoder_bias=True).double()
    with torch.no_grad():
        d.b_enc.fill_(0.0)
    d.meta = {"site": site, "model": circuitsae.models.model_name(lm), "first_position": 1}
    return d


def test_the_sub_blocks_add_up_to_the_residual_stream(lm, ioi):
    """resid.L = resid.(L-1) + attn.L + mlp.L: attn/mlp sites are what each sub-block adds (post-norm for Gemma)."""
    names = ["resid.0", "attn.1", "mlp.1", "resid.1", "attn.2", "mlp.2", "resid.2"]
    got = record(lm._module, ioi.base.to(lm._module.device), names)
    for layer in (1, 2):
        parts = got[f"resid.{layer - 1}"] + got[f"attn.{layer}"] + got[f"mlp.{layer}"]
        torch.testing.assert_close(parts, got[f"resid.{layer}"], rtol=0, atol=1e-10)


def test_harvest_stops_after_the_deepest_site(lm, tmp_path):
    """Later blocks and the unembedding never run (counted with forward hooks)."""
    hf = lm._module
    blocks = sites.module(hf, "resid.0"), sites.module(hf, "resid.2"), sites.module(hf, "resid.3")
    calls = {"resid.0": 0, "resid.2": 0, "resid.3": 0, "lm_head": 0}
    handles = [m.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
               for k, m in zip(calls, [*blocks, hf.get_output_embeddings()])]  # fmt: skip
    try:
        store = circuitsae.harvest(model=lm, sites=("resid.0", "mlp.1"), tokens=60, ctx_len=16, batch_size=4,
                                   shard_contexts=4, corpus="sotu", out=str(tmp_path / "s"), progress=False)  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    assert calls["resid.0"] > 0 and calls["resid.2"] == calls["resid.3"] == calls["lm_head"] == 0
    assert store.sites == ["resid.0", "mlp.1"] and store.n_rows("train") >= 60


@pytest.mark.parametrize("site", ["resid.1", "mlp.2", "attn.1"])
def test_splicing_with_the_error_term_reproduces_the_clean_logits(lm, ioi, site):
    clean = circuitsae.run_spliced(lm, ioi.base, {})
    kept = circuitsae.run_spliced(lm, ioi.base, {site: _sae(lm, site)}, keep_error=True)
    # float64; x̂ + (x − x̂) rounds to within 1e-16 of x, which the random tiny Gemmas amplify up to ~1e-7
    torch.testing.assert_close(kept, clean, rtol=0, atol=1e-6)
    spliced = circuitsae.run_spliced(lm, ioi.base, {site: _sae(lm, site)})
    assert not torch.allclose(spliced, clean)  # the reconstruction itself does change the run


def test_fast_evaluator_equals_the_hook_evaluator(lm, ioi):
    """Same states, same removals: the block-only path (where the family allows it) and full passes agree."""
    name = circuitsae.models.model_name(lm)
    assert Blocks.supports(lm, "resid.1") == (name in FAST)
    fd = feature_deltas(lm, _sae(lm, "resid.1"), "resid.1", ioi.base, ioi.target, lengths=ioi.lengths)
    k = fd.n_candidates
    removals = [torch.tensor([0]), torch.tensor([1, 2]), torch.arange(k)]
    out = {}
    for engine in ("auto", "hook"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no silent fallback from the fast path
            ev = make_evaluator(lm, fd, ioi.base, engine)
        state = ev.set_state(torch.ones(k, dtype=torch.bool))
        out[engine] = (
            ev.name,
            state["logits"].clone(),
            ev.without_per_prompt(removals),
            ev.gradient(torch.ones(k, dtype=bool)),
        )
        ev.remove([0, 1])
        out[engine] += (ev.state()["kl"],)
    assert out["auto"][0] == ("downstream" if name in FAST else "hook")
    for a, b in zip(out["auto"][1:], out["hook"][1:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_acdc_runs_on_every_family(lm, ioi):
    res = acdc(lm, _sae(lm, "resid.1"), "resid.1", ioi, thresholds=[1e-3, 1e-1], progress=False)
    assert res.n_candidates > 0 and len(res.records) == 2
    assert res.records[0]["n_features"] >= res.records[1]["n_features"]


def test_tree_segments_equal_full_passes(lm, ioi):
    ids = ioi.base.to(lm._module.device)
    xs = record(lm._module, ids, ["resid.0", "resid.2"])
    seg = _Segment(lm, "resid.0", "resid.2")
    assert seg.engine == ("downstream" if circuitsae.models.model_name(lm) in FAST else "hook")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seg.check(xs["resid.0"], xs["resid.2"], ids, ioi.lengths.tolist())
    assert seg.engine == ("downstream" if circuitsae.models.model_name(lm) in FAST else "hook")


def test_ioi_prompts_are_built(lm, ioi):
    assert len(ioi) == 4 and (ioi.base[:, 0] == circuitsae.models.start_token_id(lm.tokenizer)).all()
    perf = circuitsae.ioi_performance(lm, ioi)
    assert set(perf) >= {"logit_diff", "accuracy"}
