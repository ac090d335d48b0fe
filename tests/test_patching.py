"""Feature patching (REFERENCE §4) and ACDC ordering on a tiny float64 Llama."""

import numpy as np
import pytest
import torch

import circuitsae
from circuitsae import sites
from circuitsae.circuits.acdc import acdc, acdc_reference
from circuitsae.errors import CircuitSAEError
from circuitsae.interventions.patching import feature_deltas, patch_features
from circuitsae.interventions.replay import DownstreamEvaluator, HookEvaluator
from circuitsae.metrics import kl_divergence
from circuitsae.tasks import PromptPairs

SITE = "resid.1"
_ORIG_UPDATE = __import__("circuitsae.interventions.replay", fromlist=["KeyValueWindow"]).KeyValueWindow.update
TAUS = np.logspace(-5, -1, 6)


@pytest.fixture(scope="module")
def llama64(device):
    return circuitsae.load_model("tiny-llama", device=device, dtype="float64")


@pytest.fixture(scope="module")
def gpt64(device):
    return circuitsae.load_model("tiny-gpt2", device=device, dtype="float64")


@pytest.fixture(scope="module")
def prompts():
    """Right-padded base/target pairs that differ at one position (like IOI's swapped name)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(100, 5000, (5, 9), generator=g)
    base[:, 0] = 1
    target = base.clone()
    target[:, 3] = torch.randint(100, 5000, (5,), generator=g)
    return base, target, torch.tensor([9, 8, 9, 7, 6])


def _site_acts(model, ids, site=SITE, n=256):
    with model.trace(ids):
        x = sites.read(model, site).save()
    return x.reshape(-1, x.shape[-1])


def _dicts(model, prompts, site=SITE):
    """One of every kind, in float64, set to skip position 0 like a harvested dictionary."""
    torch.manual_seed(1)
    base, target, _ = prompts
    x = torch.cat([_site_acts(model, base, site), _site_acts(model, target, site)])
    relu = circuitsae.ReluSAE(64, 48, tied=False, decoder_bias=True).double()
    with torch.no_grad():
        relu.b_enc.fill_(0.0)  # about half the codes fire: sparse deltas exercise the windowed path
    out = {
        "relu": relu,
        "gated": circuitsae.GatedSAE(64, 48).double(),
        "pca": circuitsae.PCADictionary.fit(
            torch.cat([x, torch.randn(128, 64, dtype=x.dtype, device=x.device)])
        ).double(),
        "identity": circuitsae.IdentityDictionary(64).double(),
        "topk": circuitsae.TopKSAE(64, 48, k=6).double(),
        "batchtopk": circuitsae.BatchTopKSAE(64, 48, k=6).double(),
        "jumprelu": circuitsae.JumpReLUSAE(64, 48).double(),
    }
    with torch.no_grad():  # thresholds that let a fraction of the codes through
        out["batchtopk"].threshold.fill_(0.05)
        out["jumprelu"].log_threshold.fill_(-3.0)
    for d in out.values():
        d.meta = {"first_position": 1, "site": site}
    return out


def _final(model, ids, lengths):
    with model.trace(ids):
        logits = model.output.logits.save()
    return logits[torch.arange(len(ids)), lengths - 1]


@pytest.mark.parametrize("kind", ["relu", "gated", "pca", "identity", "topk", "batchtopk", "jumprelu"])
def test_patching_nothing_is_the_base_run(llama64, prompts, kind):
    base, target, lengths = prompts
    d = _dicts(llama64, prompts)[kind]
    r = patch_features(llama64, d, SITE, base, target, [], lengths=lengths)
    torch.testing.assert_close(r.logits, _final(llama64, base, lengths), rtol=0, atol=1e-10)
    assert r.edit_magnitude == 0.0
    assert r.kl == pytest.approx(float(kl_divergence(r.base_logits, r.target_logits).mean()), abs=1e-12)


@pytest.mark.parametrize("kind", ["pca", "identity"])
def test_patching_every_feature_of_a_lossless_dictionary_is_the_target_run(llama64, prompts, kind):
    base, target, lengths = prompts
    d = _dicts(llama64, prompts)[kind]
    r = patch_features(llama64, d, SITE, base, target, "all", lengths=lengths)
    # PCA's components were fitted in float64 but are kept in float32: a rotation to ~1e-7
    torch.testing.assert_close(r.logits, _final(llama64, target, lengths), rtol=0, atol=1e-6)
    assert r.kl == pytest.approx(0.0, abs=1e-10) and r.kl_reverse == pytest.approx(0.0, abs=1e-10)
    assert r.edit_magnitude > 0


def test_patch_is_the_formula_at_the_site(llama64, prompts):
    """x' = x + Σ_{j∈F} (c̄_j − c_j) f_j, base error kept, positions from first_position on."""
    base, target, lengths = prompts
    sae = _dicts(llama64, prompts)["relu"]
    feats = [0, 5, 7, 20]
    x, xt = _site_acts(llama64, base).reshape(5, 9, 64), _site_acts(llama64, target).reshape(5, 9, 64)
    x, xt = x.cpu(), xt.cpu()  # the formula, computed by hand on the CPU
    dc = sae.encode(xt) - sae.encode(x)
    x_new = x.clone()
    x_new[:, 1:] += dc[:, 1:, feats] @ sae.W_dec[feats]
    with llama64.trace(base):
        sites.read(llama64, SITE)[:] = x_new.to(llama64.device)
        logits = llama64.output.logits.save()
    r = patch_features(llama64, sae, SITE, base, target, feats, lengths=lengths)
    want = logits.detach().cpu()[torch.arange(5), lengths - 1]
    torch.testing.assert_close(r.logits.cpu(), want, rtol=0, atol=1e-10)
    norms = (x_new - x).norm(dim=-1)
    valid = (torch.arange(9)[None] >= 1) & (torch.arange(9)[None] < lengths[:, None])
    assert r.edit_magnitude == pytest.approx(float(norms[valid].mean().detach()), rel=1e-10)


def test_patching_several_sites_at_once(llama64, prompts):
    base, target, lengths = prompts
    ident = circuitsae.IdentityDictionary(64).double()
    ident.meta = {"first_position": 1}
    both = {"resid.0": ident, "resid.2": ident}
    r = patch_features(llama64, both, None, base, target, "all", lengths=lengths)
    torch.testing.assert_close(r.logits, _final(llama64, target, lengths), rtol=0, atol=1e-8)
    assert set(r.edit_by_site) == {"resid.0", "resid.2"}
    r0 = patch_features(llama64, both, None, base, target, {"resid.0": [], "resid.2": []}, lengths=lengths)
    torch.testing.assert_close(r0.logits, r0.base_logits, rtol=0, atol=1e-10)


def test_kl_of_identical_runs_is_zero():
    z = torch.randn(4, 50, dtype=torch.float64)
    assert kl_divergence(z, z).abs().max() < 1e-12
    assert kl_divergence(z, z + 3.0).abs().max() < 1e-12  # a constant shift is the same distribution


@pytest.mark.parametrize("kind,batch_visits", [("relu", 64), ("relu", 3), ("pca", 64), ("topk", 64), ("jumprelu", 64)])
def test_acdc_equals_the_sequential_reference(llama64, prompts, kind, batch_visits):
    """Same decisions however the visits are batched (small batches: many wrong guesses, memo partly reused)."""
    base, target, lengths = prompts
    d = _dicts(llama64, prompts)[kind]
    fast = acdc(llama64, d, SITE, base, target, lengths=lengths, thresholds=TAUS, progress=False,
                batch_visits=batch_visits)  # fmt: skip
    ref = acdc_reference(llama64, d, SITE, base, target, lengths=lengths, thresholds=TAUS)
    assert fast.engine == "downstream"
    assert fast.removed_at == ref.removed_at and fast.order == ref.order
    for a, b in zip(fast.records, ref.records):
        assert a["n_features"] == b["n_features"]
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-8, abs=1e-12)
        assert a["edit_magnitude"] == pytest.approx(b["edit_magnitude"], rel=1e-10)
    assert sum(r["n_features"] for r in fast.records) < fast.n_candidates * len(TAUS)  # removals happened


def test_acdc_on_a_model_without_the_fast_path_uses_hooks_and_agrees(gpt64, prompts):
    base, target, lengths = prompts
    d = circuitsae.IdentityDictionary(64).double()
    d.meta = {"first_position": 1}
    fast = acdc(gpt64, d, "resid.1", base, target, lengths=lengths, thresholds=TAUS, progress=False)
    ref = acdc_reference(gpt64, d, "resid.1", base, target, lengths=lengths, thresholds=TAUS)
    assert fast.engine == "hook"
    assert fast.removed_at == ref.removed_at


def test_acdc_reads_prompt_pairs_as_it_reads_their_tensors(llama64, prompts):
    base, target, lengths = prompts
    d = _dicts(llama64, prompts)["relu"]
    want = acdc(llama64, d, SITE, base, target, lengths=lengths, thresholds=TAUS, progress=False)
    got = acdc(llama64, d, SITE, PromptPairs(base, target, lengths), thresholds=TAUS, progress=False)
    assert got.order == want.order and got.records == want.records and "logit_diff" not in got.records[0]
    answers = (base[:, 1], base[:, 2])  # any two tokens per prompt: their logit difference is recorded
    with_answers = acdc(llama64, d, SITE, PromptPairs(base, target, lengths), thresholds=TAUS, progress=False,
                        answer_tokens=answers)  # fmt: skip
    assert all("logit_diff" in r for r in with_answers.records)
    with pytest.raises(CircuitSAEError, match="not both"):
        acdc(llama64, d, SITE, PromptPairs(base, target, lengths), target, progress=False)


def test_acdc_curves_are_monotone_as_acdc_guarantees(llama64, prompts):
    base, target, lengths = prompts
    d = _dicts(llama64, prompts)["relu"]
    res = acdc(llama64, d, SITE, base, target, lengths=lengths, progress=False)
    n = [r["n_features"] for r in res.records]
    assert n == sorted(n, reverse=True) and n[0] <= res.n_candidates
    prev_kl, prev_n = res.start["all"]["kl"], res.n_candidates
    for r in res.records:  # each removal at τ raised the KL by less than τ
        assert r["kl"] - prev_kl < r["tau"] * max(prev_n - r["n_features"], 1) + 1e-9
        prev_kl, prev_n = r["kl"], r["n_features"]
    assert len(res.order) == res.n_candidates == len(set(res.order))
    assert res.records[-1]["n_features"] == 0 or res.records[-1]["tau"] == 1.0


def test_downstream_and_hook_evaluators_agree(llama64, prompts):
    base, target, lengths = prompts
    d = _dicts(llama64, prompts)["relu"]
    fd = feature_deltas(llama64, d, SITE, base, target, lengths=lengths)
    k = fd.n_candidates
    member = torch.rand(k, generator=torch.Generator().manual_seed(3)) < 0.7
    fast, hook = DownstreamEvaluator(llama64, fd), HookEvaluator(llama64, fd, base)
    sf, sh = fast.set_state(member), hook.set_state(member)
    torch.testing.assert_close(sf["logits"], sh["logits"], rtol=0, atol=1e-9)
    sets = [torch.tensor([j]) for j in range(0, k, 3)] + [torch.tensor([0, 1, 2])]
    torch.testing.assert_close(fast.without(sets), hook.without(sets), rtol=1e-9, atol=1e-12)


def test_the_windowed_replay_checks_itself_and_falls_back_with_one_warning(llama64, prompts, monkeypatch):
    import warnings

    from circuitsae.interventions import replay as downstream

    base, target, lengths = prompts
    fd = feature_deltas(llama64, _dicts(llama64, prompts)["relu"], SITE, base, target, lengths=lengths)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ev = downstream.make_evaluator(llama64, fd, base)
    assert isinstance(ev, DownstreamEvaluator) and ev.replay_error() < 1e-9 and ev.evaluations == 0
    assert not ev.member.any()  # the check leaves the state at "nothing patched"

    def stale(self, *args, **kwargs):  # a replay whose earlier keys are wrong (shapes right)
        ks, vs = _ORIG_UPDATE(self, *args, **kwargs)
        return (ks * 0.5, vs) if self.replay is not None else (ks, vs)

    monkeypatch.setattr(downstream.KeyValueWindow, "update", stale)
    with pytest.warns(UserWarning, match="windowed key/value replay is off") as caught:
        ev = downstream.make_evaluator(llama64, fd, base)
    assert isinstance(ev, HookEvaluator) and len(caught) == 1

    # a cache called another way (the transformers convention changed): the same one warning
    def broken(self, *args, **kwargs):
        if self.replay is not None:
            raise TypeError("update() got an unexpected keyword argument")
        return _ORIG_UPDATE(self, *args, **kwargs)

    monkeypatch.setattr(downstream.KeyValueWindow, "update", broken)
    with pytest.warns(UserWarning, match="replay failed \\(TypeError"):
        assert isinstance(downstream.make_evaluator(llama64, fd, base), HookEvaluator)
    with pytest.raises(RuntimeError, match="replay failed"):
        downstream.make_evaluator(llama64, fd, base, engine="downstream")


def test_attribution_order_gives_a_curve_from_all_to_none(llama64, prompts):
    base, target, lengths = prompts
    d = _dicts(llama64, prompts)["pca"]
    res = acdc(llama64, d, SITE, base, target, lengths=lengths, order="attribution", progress=False)
    n = [r["n_features"] for r in res.records]
    assert n[0] == res.n_candidates and n[-1] == 0 and n == sorted(n, reverse=True)
    assert res.records[0]["kl"] == pytest.approx(res.start["all"]["kl"], abs=1e-10)
    assert res.records[-1]["kl"] == pytest.approx(res.start["none"]["kl"], abs=1e-10)
    assert sorted(res.order) == sorted(res.order) and len(res.order) == res.n_candidates


def test_bad_input_is_one_line(llama64, prompts):
    base, target, lengths = prompts
    d = _dicts(llama64, prompts)["relu"]
    with pytest.raises(CircuitSAEError, match="same length"):
        patch_features(llama64, d, SITE, base, target[:, :-1], [1])
    with pytest.raises(CircuitSAEError, match="trained on site resid.1, not resid.2"):
        patch_features(llama64, d, "resid.2", base, target, [1])
    wide = circuitsae.ReluSAE(32, 48)
    with pytest.raises(CircuitSAEError, match="d=32"):
        patch_features(llama64, wide, SITE, base, target, [1])
    with pytest.raises(CircuitSAEError, match="nothing to patch"):
        acdc(llama64, d, SITE, base, base, lengths=lengths, progress=False)
    with pytest.raises(CircuitSAEError, match="lie in 0..47"):
        patch_features(llama64, d, SITE, base, target, [48])


def test_pairs_of_unequal_real_length_are_refused(llama64, prompts):
    base, target, lengths = prompts
    d = _dicts(llama64, prompts)["relu"]
    # the target of prompt 1 is one token longer than its base: same padded shape, positions misaligned
    short = lengths.clone()
    short[1] -= 1
    for call in (
        lambda: patch_features(llama64, d, SITE, base, target, [1], lengths=short, target_lengths=lengths),
        lambda: acdc(llama64, d, SITE, base, target, lengths=short, target_lengths=lengths, progress=False),
        lambda: feature_deltas(llama64, d, SITE, base, target, lengths=short, target_lengths=lengths),
    ):
        with pytest.raises(CircuitSAEError, match="base prompt 1 has 7 real tokens and its target 8"):
            call()
    # without lengths, the trailing padding (the tokenizer's pad id) shows it
    pad = llama64.tokenizer.pad_token_id
    b, t = base.clone(), target.clone()
    for i, n in enumerate(lengths.tolist()):
        b[i, n:] = t[i, n:] = pad
    b[2, 8] = pad
    with pytest.raises(CircuitSAEError, match="base prompt 2 has 8 real tokens and its target 9"):
        patch_features(llama64, d, SITE, b, t, [1])
    patch_features(llama64, d, SITE, b[[0, 1, 3]], t[[0, 1, 3]], [1])  # equal lengths still pass


def test_acdc_interrupted_after_some_thresholds_resumes_to_the_same_result(llama64, prompts, tmp_path, monkeypatch):
    """The state kept after each threshold is picked up again; the finished run equals an uninterrupted one."""
    import json
    import sys

    acdc_module = sys.modules["circuitsae.circuits.acdc"]  # the package's `acdc` attribute is the function
    base, target, lengths = prompts
    d = _dicts(llama64, prompts)["relu"]
    whole = acdc(llama64, d, SITE, base, target, lengths=lengths, thresholds=TAUS, progress=False)
    state = tmp_path / "acdc.state.json"
    real, calls = acdc_module._record, []

    def crash_at_the_third_threshold(tau, *a, **k):
        calls.append(tau)
        if len([t for t in calls if t is not None]) == 3:
            raise KeyboardInterrupt
        return real(tau, *a, **k)

    monkeypatch.setattr(acdc_module, "_record", crash_at_the_third_threshold)
    with pytest.raises(KeyboardInterrupt):
        acdc(llama64, d, SITE, base, target, lengths=lengths, thresholds=TAUS, progress=False, checkpoint=state)
    kept = json.loads(state.read_text())
    assert len(kept["records"]) == 2
    monkeypatch.setattr(acdc_module, "_record", real)
    resumed = acdc(llama64, d, SITE, base, target, lengths=lengths, thresholds=TAUS, progress=False, checkpoint=state)
    assert not state.exists()
    assert resumed.removed_at == whole.removed_at and resumed.order == whole.order
    for a, b in zip(resumed.records, whole.records):
        assert a["n_features"] == b["n_features"] and a["kl"] == pytest.approx(b["kl"], rel=1e-8, abs=1e-12)
    state.write_text(json.dumps({**kept, "taus": [1.0]}))
    with pytest.raises(CircuitSAEError, match="checkpoint of another ACDC run .*taus"):
        acdc(llama64, d, SITE, base, target, lengths=lengths, thresholds=TAUS, progress=False, checkpoint=state)
