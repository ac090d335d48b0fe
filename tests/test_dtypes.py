"""Every model-touching operation with a bfloat16 or float16 model and a float32 dictionary, on the CPU.

Each result is compared with the same operation on the float32 model: half precision moves logits by about
its rounding step (2^-8 relative for bfloat16), so the comparisons allow that much, no more. Reductions (CE, KL,
FVU, effects) come back in float32 or wider. Before the library cast activations to the dictionary's dtype and
edits back, patch_features raised on any half-precision model (float32 codes met a half-precision decoder).
"""

import warnings

import pytest
import torch

import circuitsae
from circuitsae import metrics
from circuitsae.circuits.acdc import acdc
from circuitsae.dictionaries import load_dictionary

SITE = "resid.1"
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", params=HALF, ids=["bfloat16", "float16"])
def half(request, device):
    return circuitsae.load_model("tiny-llama", device=device, dtype=request.param)


@pytest.fixture(scope="module")
def ioi(tiny_llama):
    return circuitsae.make_ioi(tiny_llama, n=4, seed=0)


@pytest.fixture(scope="module")
def sae_path(wired, tmp_path_factory):
    _, dicts = wired
    return dicts["resid.1"].save(tmp_path_factory.mktemp("sae") / "resid.1-relu")


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps  # one rounding step of the model's dtype (2^-7 bfloat16, 2^-10 float16)


def test_a_half_model_keeps_its_dtype_and_the_dictionary_its_own(half, sae_path, ioi):
    sae = load_dictionary(sae_path)
    assert next(half._module.parameters()).dtype in HALF and sae.W_dec.dtype == torch.float32
    logits = circuitsae.run_spliced(half, ioi.base, {SITE: sae})
    assert logits.dtype == next(half._module.parameters()).dtype and sae.W_dec.dtype == torch.float32
    clean = circuitsae.run_spliced(half, ioi.base, {})
    kept = circuitsae.run_spliced(half, ioi.base, {SITE: sae}, keep_error=True)
    torch.testing.assert_close(kept, clean, rtol=0, atol=0)  # x̂ + (x − x̂) is x again in the model's dtype


def test_patch_features(half, tiny_llama, sae_path, ioi):
    feats = list(range(0, 16, 2))
    want = circuitsae.patch_features(tiny_llama, load_dictionary(sae_path), SITE, ioi.base, ioi.target, feats,
                                     lengths=ioi.lengths)  # fmt: skip
    got = circuitsae.patch_features(half, load_dictionary(sae_path), SITE, ioi.base, ioi.target, feats,
                                    lengths=ioi.lengths)  # fmt: skip
    dtype = next(half._module.parameters()).dtype
    assert got.logits.dtype == torch.float32 and got.kl_per_prompt.dtype == torch.float32
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=2 * _eps(dtype) * float(want.logits.abs().max()))
    assert got.edit_magnitude == pytest.approx(want.edit_magnitude, rel=_eps(dtype))
    assert got.kl == pytest.approx(want.kl, abs=1e-3)


@pytest.mark.parametrize("engine", ["downstream", "hook"])
@pytest.mark.parametrize("order", ["acdc", "attribution"])
def test_acdc_and_attribution(half, tiny_llama, sae_path, ioi, engine, order):
    kw = dict(thresholds=[1e-3, 1e-1], engine=engine, order=order, progress=False)
    want = acdc(tiny_llama, load_dictionary(sae_path), SITE, ioi, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast evaluator must not fall back to hooks in half precision
        got = acdc(half, load_dictionary(sae_path), SITE, ioi, **kw)
    assert got.engine == engine and got.n_candidates == want.n_candidates
    for end in ("none", "all"):
        assert got.start[end]["kl"] == pytest.approx(want.start[end]["kl"], abs=2e-3)
    assert all(r["kl"] >= 0 and r["kl"] == r["kl"] for r in got.records)  # finite, no NaN
    if order == "acdc":  # the coarse thresholds are far above half-precision noise: the same decisions
        assert [r["n_features"] for r in got.records] == [r["n_features"] for r in want.records]


def test_harvest_evaluate_and_fidelity(half, tiny_llama, sae_path, tmp_path):
    kw = dict(sites=(SITE,), tokens=120, ctx_len=16, batch_size=4, shard_contexts=4, corpus="sotu", progress=False)
    a = circuitsae.harvest(model=tiny_llama, out=str(tmp_path / "f32"), dtype="float32", **kw)
    b = circuitsae.harvest(model=half, out=str(tmp_path / "half"), dtype="float32", **kw)
    dtype = next(half._module.parameters()).dtype
    assert b.config["model_dtype"] == str(dtype).removeprefix("torch.") and a.config["model_dtype"] == "float32"
    xa, xb = a.activations(SITE, "train"), b.activations(SITE, "train")
    assert (xb - xa).norm() / xa.norm() < _eps(dtype)
    ev = dict(dictionaries=(str(sae_path),), contexts=4, progress=False)
    want = circuitsae.evaluate(model=tiny_llama, out=str(tmp_path / "a.json"), **ev).results
    got = circuitsae.evaluate(model=half, out=str(tmp_path / "b.json"), **ev).results
    (name,) = want
    for k in ("ce_clean", "ce_spliced", "ce_zero"):
        assert getattr(got[name], k) == pytest.approx(getattr(want[name], k), rel=_eps(dtype) / 8), k
    assert got[name].kl == pytest.approx(want[name].kl, abs=2e-3)


def test_cross_entropy_and_kl_accumulate_in_float32():
    logits = torch.randn(2, 5, 300).to(torch.bfloat16)
    ids = torch.randint(0, 300, (2, 5))
    ce = metrics.cross_entropy(logits, ids)
    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce, metrics.cross_entropy(logits.float(), ids))
    assert metrics.kl_divergence(logits, logits.flip(0)).dtype == torch.float32


def test_feature_analysis_and_causal_tree(half, tiny_llama, wired):
    store, dicts = wired
    rep = circuitsae.analyse_feature(half, dicts[SITE], store, 3, k=3, progress=False)
    ref = circuitsae.analyse_feature(tiny_llama, dicts[SITE], store, 3, k=3, progress=False)
    assert rep.max_activation == pytest.approx(ref.max_activation)  # from the store: the same rows
    assert rep.logit_effect["positions"] == ref.logit_effect["positions"]
    kw = dict(depth=2, branching=2, contexts=4, store=store, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the block-only segments must agree with the model in half precision
        got = circuitsae.causal_tree(half, dicts, ("resid.2", 7), **kw)
    want = circuitsae.causal_tree(tiny_llama, dicts, ("resid.2", 7), **kw)
    first = max(want.edges(data=True), key=lambda e: e[2]["effect"])
    assert (first[0], first[1]) in got.edges  # the wired edge survives half precision
    assert got.edges[first[0], first[1]]["effect"] == pytest.approx(first[2]["effect"], rel=0.1)


def test_activations_beyond_float16_stop_the_harvest_before_anything_is_written(tmp_path, device):
    lm = circuitsae.load_model("tiny-llama", device=device, dtype="float32")
    with torch.no_grad():
        lm._module.model.embed_tokens.weight.mul_(1e6)  # a residual stream like Gemma's outliers, and beyond
    kw = dict(model=lm, sites=("resid.0",), tokens=60, ctx_len=16, batch_size=4, corpus="sotu", progress=False)
    with pytest.raises(circuitsae.CircuitSAEError, match="beyond float16's range.*--dtype bfloat16") as err:
        circuitsae.harvest(out=str(tmp_path / "f16"), dtype="float16", **kw)
    assert "\n" not in str(err.value) and not list((tmp_path / "f16").glob("train-*"))
    store = circuitsae.harvest(out=str(tmp_path / "bf16"), dtype="bfloat16", **kw)
    assert torch.isfinite(store.activations("resid.0", "train")).all()


def test_gemma_families_refuse_float16_and_store_bfloat16(tmp_path, device):
    with pytest.raises(circuitsae.CircuitSAEError, match="cannot run in float16.*bfloat16 or float32"):
        circuitsae.load_model("tiny-gemma3", device=device, dtype="float16")
    lm = circuitsae.load_model("tiny-gemma3", device=device, dtype="float32")
    store = circuitsae.harvest(model=lm, sites=("resid.1",), tokens=60, ctx_len=16, batch_size=4, corpus="sotu",
                               out=str(tmp_path / "s"), progress=False)  # fmt: skip
    assert store.dtype == "bfloat16"  # the default storage dtype follows the family
    other = circuitsae.harvest(model=circuitsae.load_model("tiny-llama", device=device, dtype="float32"),
                               sites=("resid.1",), tokens=60, ctx_len=16, batch_size=4, corpus="sotu",
                               out=str(tmp_path / "l"), progress=False)  # fmt: skip
    assert other.dtype == "float16"
