"""Contract tests every dictionary kind passes, plus each architecture's own maths."""

import json

import pytest
import safetensors.torch
import torch

from circuitsae import CircuitSAEError
from circuitsae.dictionaries import (
    BatchTopKSAE,
    GatedSAE,
    IdentityDictionary,
    JumpReLUSAE,
    PCADictionary,
    ReluSAE,
    TopKSAE,
    load_dictionary,
)
from circuitsae.interventions.splice import run_ablated, run_spliced

D = 64  # the tiny models' width


def _randomise(d):
    """Give every parameter non-trivial values (biases start at zero otherwise)."""
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1 * torch.randn_like(p))
        d.W_dec.div_(d.W_dec.norm(dim=-1, keepdim=True))  # feature directions stay unit norm
    return d


def _with_threshold(sae, theta):
    sae.threshold.fill_(theta)
    return sae


KINDS = {
    "relu-tied": lambda: ReluSAE(D, 128),
    "relu-untied-bdec": lambda: _randomise(ReluSAE(D, 96, tied=False, decoder_bias=True)),
    "gated": lambda: _randomise(GatedSAE(D, 96)),
    "topk": lambda: _randomise(TopKSAE(D, 96, k=8)),
    "batchtopk": lambda: _with_threshold(_randomise(BatchTopKSAE(D, 96, k=8)), 0.3),
    "jumprelu": lambda: _randomise(JumpReLUSAE(D, 96)),
    "gated-as-jumprelu": lambda: _randomise(GatedSAE(D, 96)).to_jumprelu(),
    "pca": lambda: PCADictionary.fit(torch.randn(500, D) @ torch.randn(D, D) + 3.0),
    "identity": lambda: IdentityDictionary(D),
}


@pytest.fixture(params=list(KINDS))
def dictionary(request):
    return KINDS[request.param]()


def test_shapes_and_unit_directions(dictionary):
    x = torch.randn(2, 5, D)
    codes = dictionary.encode(x)
    assert codes.shape == (2, 5, dictionary.d_dict)
    assert dictionary.decode(codes).shape == x.shape
    out = dictionary(x)
    assert torch.equal(out.codes, codes) and out.x_hat.shape == x.shape
    assert dictionary.directions.shape == (dictionary.d_dict, D)
    torch.testing.assert_close(dictionary.directions.norm(dim=-1), torch.ones(dictionary.d_dict))


def test_decode_is_linear_in_directions(dictionary):
    codes = torch.randn(7, dictionary.d_dict)
    bias = 0 if dictionary.b_dec is None else dictionary.b_dec
    torch.testing.assert_close(dictionary.decode(codes), codes @ dictionary.directions + bias)


def test_save_load_round_trip(dictionary, tmp_path):
    dictionary.meta.update(model="tiny-llama", site="resid.1")
    dictionary.save(tmp_path / "d")
    loaded = load_dictionary(tmp_path / "d")
    assert type(loaded) is type(dictionary) and loaded.config() == dictionary.config()
    assert loaded.meta["site"] == "resid.1"
    x = torch.randn(9, D)
    torch.testing.assert_close(loaded(x).x_hat, dictionary(x).x_hat, rtol=0, atol=0)


def test_splice_with_error_term_is_the_clean_run(dictionary, tiny_llama):
    ids = torch.randint(3, 1000, (2, 12))
    clean = run_spliced(tiny_llama, ids, {})
    spliced = run_spliced(tiny_llama, ids, {"resid.1": dictionary}, keep_error=True)
    torch.testing.assert_close(spliced, clean, rtol=1e-5, atol=1e-5)


def test_splice_without_error_term_changes_a_lossy_dictionary(tiny_llama):
    ids = torch.randint(3, 1000, (2, 12))
    clean = run_spliced(tiny_llama, ids, {})
    assert not torch.allclose(run_spliced(tiny_llama, ids, {"resid.1": ReluSAE(D, 128)}), clean, atol=1e-3)
    # lossless dictionaries reproduce the model exactly even without the error term
    pca = PCADictionary.fit(torch.randn(300, D))
    torch.testing.assert_close(run_spliced(tiny_llama, ids, {"mlp.2": pca}), clean, rtol=1e-4, atol=1e-4)


def test_splice_leaves_positions_before_first_position(tiny_llama):
    ids = torch.randint(3, 1000, (1, 6))
    sae = ReluSAE(D, 32)
    sae.meta["first_position"] = 1
    clean = run_spliced(tiny_llama, ids, {})
    spliced = run_spliced(tiny_llama, ids, {"resid.2": sae})
    torch.testing.assert_close(spliced[:, 0], clean[:, 0])  # causal: position 0 untouched
    assert not torch.allclose(spliced[:, 1:], clean[:, 1:])


def test_zero_ablation_differs_from_clean(tiny_llama):
    ids = torch.randint(3, 1000, (1, 6))
    assert not torch.allclose(run_ablated(tiny_llama, ids, ["resid.1"]), run_spliced(tiny_llama, ids, {}))


@pytest.mark.parametrize(
    "make, site, message",
    [
        (lambda: ReluSAE(32, 64), "resid.1", "d=32"),
        (lambda: ReluSAE(D, 64), "resid.9", "out of range"),
    ],
)
def test_splice_refuses_mismatched_dictionary(tiny_llama, make, site, message):
    with pytest.raises(CircuitSAEError, match=message):
        run_spliced(tiny_llama, torch.zeros(1, 4, dtype=torch.long), {site: make()})


def test_splice_refuses_dictionary_of_another_site_or_model(tiny_llama):
    sae = ReluSAE(D, 64)
    sae.meta["site"] = "resid.2"
    with pytest.raises(CircuitSAEError, match="trained on site resid.2, not resid.1"):
        run_spliced(tiny_llama, torch.zeros(1, 4, dtype=torch.long), {"resid.1": sae})
    sae.meta.update(site="resid.1", model="someone/else")
    with pytest.raises(CircuitSAEError, match="trained on someone/else"):
        run_spliced(tiny_llama, torch.zeros(1, 4, dtype=torch.long), {"resid.1": sae})


@pytest.mark.parametrize("kind", ["relu-tied", "relu-untied-bdec", "gated", "topk", "batchtopk", "jumprelu"])
def test_folding_the_input_scale(kind):
    """A dictionary trained on s·x, folded, gives on raw x the codes/s and reconstruction/s."""
    sae = KINDS[kind]()
    x, s = torch.randn(20, D), 3.7
    before = sae(s * x)
    sae.fold_input_scale(s)
    after = sae(x)
    torch.testing.assert_close(after.codes, before.codes / s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.x_hat, before.x_hat / s, rtol=1e-5, atol=1e-5)


def test_gated_encoder_is_a_jumprelu():
    """REFERENCE §2: f̃_i = u_i · 1[u_i > max(θ_i, 0)], u = W_mag x_c + b_mag, θ = b_mag − e^{r_mag} b_gate."""
    sae = GatedSAE(D, 200)
    with torch.no_grad():
        sae.b_gate.normal_()
        sae.r_mag.normal_(0, 0.5)
        sae.b_mag.normal_()
        sae.b_dec.normal_()
    x = torch.randn(300, D)
    w_mag = sae.r_mag.exp()[:, None] * sae.W_gate
    u = (x - sae.b_dec) @ w_mag.T + sae.b_mag
    theta = sae.jumprelu_threshold()
    expected = u * (u > theta.clamp_min(0)).float()
    torch.testing.assert_close(sae.encode(x), expected, rtol=1e-5, atol=1e-5)
    assert 0 < (expected != 0).float().mean() < 1


@pytest.mark.parametrize("make", [lambda d, f: ReluSAE(d, f, tied=False, decoder_bias=True), GatedSAE])
def test_untied_encoders_start_with_a_reconstruction_of_the_right_size(make):
    # with random unit features about half open and x̂ ≈ (d_sae/2d)·x·(encoder scale); the encoder is
    # scaled by 2d/d_sae so that the first steps start from x̂ ≈ x, not from 4x (d_sae = 8d)
    torch.manual_seed(0)
    sae, x = make(32, 256), torch.randn(512, 32)
    with torch.no_grad():
        out = sae(x)
        gamma = (out.x_hat.pow(2).sum() / (out.x_hat * x).sum()).item()
        scale = (out.x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item()
    assert 0.7 < scale < 1.4 and 0.7 < gamma < 1.4, (scale, gamma)


def test_gated_aux_loss_sends_no_gradient_to_the_decoder():
    sae = _randomise(GatedSAE(D, 48))
    x = torch.randn(30, D)
    loss = sae.loss(x, coefficient=0.0)
    loss.aux.backward()
    assert sae.W_dec.grad is None or torch.count_nonzero(sae.W_dec.grad) == 0
    # b_dec gets gradient only through the encoder input x_c = x − b_dec, not as decoder bias:
    expected = torch.autograd.grad(
        (x - (torch.relu((x - sae.b_dec) @ sae.W_gate.T + sae.b_gate) @ sae.W_dec.detach() + sae.b_dec.detach()))
        .pow(2)
        .sum(-1)
        .mean(),
        sae.b_dec,
    )[0]
    torch.testing.assert_close(sae.b_dec.grad, expected)
    assert torch.count_nonzero(sae.W_gate.grad) > 0  # it does train the gate path
    assert sae.r_mag.grad is None or torch.count_nonzero(sae.r_mag.grad) == 0  # magnitude path is not in it


def test_gated_loss_terms_match_the_definition():
    sae = _randomise(GatedSAE(D, 48))
    x = torch.randn(30, D)
    lam = 0.3
    loss = sae.loss(x, lam)
    pi = (x - sae.b_dec) @ sae.W_gate.T + sae.b_gate
    mag = torch.relu((x - sae.b_dec) @ (sae.r_mag.exp()[:, None] * sae.W_gate).T + sae.b_mag)
    f = (pi > 0).float() * mag
    x_hat = f @ sae.W_dec + sae.b_dec
    rec = (x - x_hat).pow(2).sum(-1).mean()
    sparsity = torch.relu(pi).sum(-1).mean()
    aux = (x - (torch.relu(pi) @ sae.W_dec + sae.b_dec)).pow(2).sum(-1).mean()
    torch.testing.assert_close(loss.total, rec + lam * sparsity + aux)


def test_relu_loss_matches_the_paper_form():
    sae = ReluSAE(D, 80)
    with torch.no_grad():
        sae.b_enc.normal_()
    x = torch.randn(25, D)
    c = torch.relu(x @ sae.W_dec.T + sae.b_enc)  # tied: encoder M = decoder M
    x_hat = c @ sae.W_dec  # x̂ = Mᵀc, no decoder bias
    alpha = 0.01
    expected = (x - x_hat).pow(2).sum(-1).mean() + alpha * c.abs().sum(-1).mean()
    torch.testing.assert_close(sae.loss(x, alpha).total, expected)
    assert sae.b_dec is None and sae.W_enc is sae.W_dec


def test_pca_is_a_lossless_rotation_sorted_by_variance():
    x = torch.randn(2000, 8) * torch.tensor([5.0, 1, 3, 0.5, 2, 0.1, 4, 1.5]) + 7
    pca = PCADictionary.fit(x)
    eye = pca.directions @ pca.directions.T
    torch.testing.assert_close(eye, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(pca.decode(pca.encode(x)), x, atol=1e-4, rtol=0)
    assert torch.all(pca.explained_variance[:-1] >= pca.explained_variance[1:])
    var = pca.encode(x).var(0)
    torch.testing.assert_close(var, pca.explained_variance, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(pca.b_dec, x.mean(0), rtol=1e-5, atol=1e-5)


def test_load_errors_are_one_line(tmp_path):
    sae = ReluSAE(8, 16)
    sae.save(tmp_path / "ok")
    with pytest.raises(CircuitSAEError, match="does not exist"):
        load_dictionary(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CircuitSAEError, match="has no cfg.json"):
        load_dictionary(tmp_path / "empty")
    cfg = json.loads((tmp_path / "ok" / "cfg.json").read_text())
    for name, change in {
        "foreign": {"format": "something-else"},
        "unknown": {"architecture": "wavelet"},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "cfg.json").write_text(json.dumps(cfg | change))
        (tmp_path / name / "sae.safetensors").write_bytes((tmp_path / "ok" / "sae.safetensors").read_bytes())
    with pytest.raises(CircuitSAEError, match="not a circuitsae dictionary"):
        load_dictionary(tmp_path / "foreign")
    with pytest.raises(CircuitSAEError, match="unknown architecture 'wavelet'"):
        load_dictionary(tmp_path / "unknown")
    (tmp_path / "nokey").mkdir()
    (tmp_path / "nokey" / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "d"}))
    with pytest.raises(CircuitSAEError, match="lacks the key 'd'"):
        load_dictionary(tmp_path / "nokey")
    (tmp_path / "shape").mkdir()
    (tmp_path / "shape" / "cfg.json").write_text(json.dumps(cfg | {"d_dict": 17}))
    (tmp_path / "shape" / "sae.safetensors").write_bytes((tmp_path / "ok" / "sae.safetensors").read_bytes())
    with pytest.raises(CircuitSAEError, match=r"W_dec has shape \(16, 8\) but cfg.json implies \(17, 8\)"):
        load_dictionary(tmp_path / "shape")
    with pytest.raises(CircuitSAEError, match=r"sae.safetensors: 22 bytes but manifest.json says"):
        (tmp_path / "ok" / "sae.safetensors").write_bytes(b"not a safetensors file")
        load_dictionary(tmp_path / "ok")
    (tmp_path / "ok" / "manifest.json").unlink()  # a folder without a manifest: the file itself is refused
    with pytest.raises(CircuitSAEError, match="not a readable safetensors"):
        load_dictionary(tmp_path / "ok")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "cfg.json").write_text(json.dumps(cfg))
    safetensors.torch.save_file({"W_dec": torch.zeros(16, 8)}, tmp_path / "keys" / "sae.safetensors")
    with pytest.raises(CircuitSAEError, match=r"missing \['b_enc'\]"):
        load_dictionary(tmp_path / "keys")


@pytest.mark.parametrize("kind", ["relu-tied", "relu-untied-bdec", "gated"])
@pytest.mark.parametrize("term", ["total", "mse", "sparsity", "aux"])
def test_hand_written_backward_equals_autograd(kind, term):
    """The fused training loss gives the reference loss and exactly its gradients, term by term."""
    sae = KINDS[kind]()
    x = torch.randn(40, D)
    fused, ref = sae.loss(x, 0.7), sae.loss_reference(x, 0.7)
    for name in ("total", "mse", "sparsity", "aux", "x_hat", "codes"):
        torch.testing.assert_close(getattr(fused, name), getattr(ref, name), rtol=1e-5, atol=1e-5)
    if not getattr(ref, term).requires_grad:
        return  # the ReLU SAE has no auxiliary term
    params = [p for p in sae.parameters()]
    g_fused = torch.autograd.grad(getattr(fused, term), params, allow_unused=True)
    g_ref = torch.autograd.grad(getattr(ref, term), params, allow_unused=True)
    for p, a, b in zip(params, g_fused, g_ref):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- TopK, BatchTopK, JumpReLU (REFERENCE §2b) ---------------------------------------------


def _pre(sae, x):
    return (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc


def test_topk_keeps_the_k_largest_pre_activations_and_its_loss_is_the_formula():
    sae = _randomise(TopKSAE(D, 96, k=5, k_aux=7))
    x = torch.randn(30, D)
    pre = _pre(sae, x)
    kth = pre.sort(-1, descending=True).values[:, 4:5]
    codes = torch.where(pre >= kth, pre, 0.0).relu()
    torch.testing.assert_close(sae.encode(x), codes)
    assert ((sae.encode(x) > 0).sum(-1) <= 5).all()
    x_hat = codes @ sae.W_dec + sae.b_dec
    mse = (x - x_hat).pow(2).sum(-1).mean()
    loss = sae.loss(x)
    torch.testing.assert_close(loss.total, mse)
    torch.testing.assert_close(loss.aux, torch.zeros(()))
    # with dead latents: ê = W_decᵀ ReLU(TopK_{k_aux}(pre on the dead)), no b_dec; α_aux = 1/32
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True
    sae.set_dead(dead)
    dead_pre = torch.where(dead, pre, float("-inf"))
    kth_dead = dead_pre.sort(-1, descending=True).values[:, 6:7]
    aux_codes = torch.where(dead_pre >= kth_dead, dead_pre, 0.0).relu()
    e = (x - x_hat).detach()
    aux = (aux_codes @ sae.W_dec - e).pow(2).sum(-1).mean()
    loss = sae.loss(x)
    torch.testing.assert_close(loss.aux, aux)
    torch.testing.assert_close(loss.total, mse + aux / 32)
    # the auxiliary term trains only the dead latents' rows
    sae.zero_grad()
    loss.aux.backward()
    live_rows = ~dead
    assert torch.count_nonzero(sae.W_enc.grad[live_rows]) == 0 and torch.count_nonzero(sae.W_dec.grad[live_rows]) == 0
    assert torch.count_nonzero(sae.W_enc.grad[dead]) > 0


def test_batchtopk_keeps_batch_times_k_values_in_training_and_thresholds_at_inference():
    sae = _randomise(BatchTopKSAE(D, 96, k=4))
    x = torch.randn(25, D)
    pre = _pre(sae, x).relu()
    loss = sae.loss(x)
    kth = pre.flatten().sort(descending=True).values[25 * 4 - 1]
    expected = torch.where(pre >= kth, pre, 0.0)
    torch.testing.assert_close(loss.codes, expected)
    assert (loss.codes > 0).sum() == 100 and len(set((loss.codes > 0).sum(-1).tolist())) > 1  # L0 varies
    torch.testing.assert_close(loss.stat, kth)
    # θ: the first value, then an exponential moving average with β = 0.99
    sae.update_threshold(2.0)
    sae.update_threshold(1.0)
    torch.testing.assert_close(sae.threshold, torch.tensor(0.99 * 2.0 + 0.01 * 1.0))
    torch.testing.assert_close(sae.encode(x), torch.where(_pre(sae, x) > sae.threshold, _pre(sae, x), 0.0))
    feats = torch.tensor([3, 50, 7])
    torch.testing.assert_close(sae.encode_features(x, feats), sae.encode(x)[:, feats])


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_batchtopk_refuses_a_batch_that_is_not_tokens_by_d(mode):
    """[B, T, d] used to keep k·B values, not k per token, silently; now it is one line (3-D encode is fine)."""
    sae = _randomise(BatchTopKSAE(D, 96, k=4))
    x = torch.randn(5, 6, D)
    for loss in (lambda: sae.loss(x, mode=mode), lambda: sae.loss_reference(x)):
        with pytest.raises(CircuitSAEError, match=r"batchtopk keeps k per token of a \[tokens, d\] batch") as e:
            loss()
        assert "\n" not in str(e.value)
    assert (sae.loss(x.reshape(-1, D), mode=mode).codes > 0).sum() == 30 * 4  # flattened: k per token
    assert sae.encode(x).shape == (5, 6, 96)


def test_jumprelu_loss_and_its_straight_through_gradients_are_the_papers():
    """L = ||x − x̂||² + λ Σ H(pre − θ); ∂/∂θ of JumpReLU −(θ/ε)K, of H −(1/ε)K, K the rectangle (REFERENCE §2b)."""
    sae = _randomise(JumpReLUSAE(D, 48, bandwidth=0.5))
    x = torch.randn(40, D)
    with torch.no_grad():  # thresholds where many pre-activations lie within ε/2 of them
        sae.log_threshold.copy_(_pre(sae, x).mean(0).abs().clamp_min(0.05).log())
    theta, eps, lam = sae.threshold.detach(), 0.5, 0.7
    pre = _pre(sae, x).detach()
    on = (pre > theta).float()
    codes = pre * on
    x_hat = codes @ sae.W_dec + sae.b_dec
    mse = (x - x_hat).pow(2).sum(-1).mean()
    loss = sae.loss(x, lam)
    torch.testing.assert_close(loss.codes, codes)
    torch.testing.assert_close(loss.total, mse + lam * on.sum(-1).mean())
    torch.testing.assert_close(sae.encode(x), codes)
    # the threshold's gradient, by the formula: through the codes (g = ∂mse/∂f) and the L0 term
    kernel = ((pre - theta).abs() / eps <= 0.5).float()
    g = (2 * (x_hat - x) / x.shape[0]) @ sae.W_dec.detach().T
    d_theta = (-(theta / eps) * kernel * g).sum(0) + lam * (-(1 / eps) * kernel).sum(0) / x.shape[0]
    (grad,) = torch.autograd.grad(loss.total, sae.log_threshold)
    assert kernel.sum() > 10  # the case does exercise the kernel
    torch.testing.assert_close(grad, d_theta * theta, rtol=1e-4, atol=1e-6)  # θ = exp(t): ∂/∂t = θ ∂/∂θ
    # the L0 term sends no gradient to the encoder (∂H/∂pre = 0)
    (g_enc,) = torch.autograd.grad(sae.loss(x, lam).sparsity, sae.W_enc, allow_unused=True)
    assert g_enc is None or torch.count_nonzero(g_enc) == 0


def test_a_gated_sae_exports_as_the_jumprelu_it_is(tmp_path):
    gated = _randomise(GatedSAE(D, 200))
    with torch.no_grad():
        gated.b_gate.normal_()
        gated.b_mag.normal_()
        gated.b_gate[:5] = -10.0  # θ > 0 for some, θ < 0 (clamped to 0: log θ = −inf) for others
        gated.b_gate[5:10] = 10.0
    jump = gated.to_jumprelu()
    assert torch.isinf(jump.log_threshold).any() and (jump.threshold > 0).any()
    x = torch.randn(300, D)
    torch.testing.assert_close(jump.encode(x), gated.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(jump(x).x_hat, gated(x).x_hat, rtol=1e-5, atol=1e-5)
    jump.save(tmp_path / "j")
    again = load_dictionary(tmp_path / "j")
    torch.testing.assert_close(again.encode(x), jump.encode(x))


def test_topk_needs_a_whole_k_within_the_dictionary():
    with pytest.raises(CircuitSAEError, match="k must be an integer"):
        TopKSAE(D, 16, k=17)
    with pytest.raises(CircuitSAEError, match="k must be an integer"):
        BatchTopKSAE(D, 16, k=2.5)
