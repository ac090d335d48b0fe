"""The sparse training path (``dictionaries/fused.py``) against the dense path and plain autograd.

The sparse path decodes and back-propagates only through the open units; it must compute the same loss, the
same codes and the same gradients as the dense path at every density — none open, a few, half, all — and a
training run must end at the same parameters whichever path its steps took.
"""

from __future__ import annotations

import pytest
import torch

from circuitsae.data.store import store_from_tensors
from circuitsae.dictionaries import BatchTopKSAE, GatedSAE, JumpReLUSAE, ReluSAE, TopKSAE, fused
from circuitsae.dictionaries.fused import GatedLoss, OpenUnits, ReluLoss, open_fraction, use_sparse
from circuitsae.training.trainer import TrainConfig, Trainer

D, F, B = 24, 80, 48


def _sae(kind: str, open_fraction: float) -> torch.nn.Module:
    """A random SAE whose encoder bias opens about ``open_fraction`` of the units on N(0, 1) inputs."""
    torch.manual_seed(0)
    sae = {
        "relu-tied": lambda: ReluSAE(D, F),
        "relu-untied": lambda: ReluSAE(D, F, tied=False),
        "relu-untied-bdec": lambda: ReluSAE(D, F, tied=False, decoder_bias=True),
        "gated": lambda: GatedSAE(D, F),
    }[kind]()
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
        # the pre-activation of a unit is ≈ N(0, |w|²): shift it by the normal quantile of the wanted fraction
        bias = "b_gate" if kind == "gated" else "b_enc"
        rows = sae.W_gate if kind == "gated" else sae.W_enc
        z = {0.0: -6.0, 1.0: 6.0}.get(open_fraction)  # 6σ: none / every unit open (all but surely)
        if z is None:
            z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(open_fraction))
        getattr(sae, bias).copy_(z * rows.norm(dim=-1))
    return sae


def _loss(sae: torch.nn.Module, x: torch.Tensor, mode: str):
    if isinstance(sae, GatedSAE):
        return GatedLoss.apply(x, sae.W_gate, sae.b_gate, sae.r_mag, sae.b_mag, sae.W_dec, sae.b_dec, 0.7, mode)
    return ReluLoss.apply(x, sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, 0.7, mode)


KINDS = ["relu-tied", "relu-untied", "relu-untied-bdec", "gated"]
DENSITIES = [0.0, 0.03, 0.5, 1.0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("density", DENSITIES)
def test_sparse_path_gives_the_dense_outputs_and_the_autograd_gradients(kind, density):
    sae = _sae(kind, density)
    x = torch.randn(B, D)
    sparse, dense = _loss(sae, x, "sparse"), _loss(sae, x, "dense")
    ref = sae.loss_reference(x, 0.7)
    opened = float((dense[-1] > 0).float().mean()) if kind != "gated" else None
    if opened is not None:
        assert 0.3 * density <= opened <= min(1.0, 3 * density)  # the fixture really gives about that density
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse[0], ref.total, rtol=1e-5, atol=1e-5)
    params = [p for p in sae.parameters()]
    n_terms = 4 if kind == "gated" else 3  # total, mse, sparsity (, aux)
    for term in range(n_terms):
        if not sparse[term].requires_grad:
            continue
        g_sparse = torch.autograd.grad(_loss(sae, x, "sparse")[term], params, allow_unused=True)
        g_ref = torch.autograd.grad(
            [ref.total, ref.mse, ref.sparsity, ref.aux][term], params, allow_unused=True, retain_graph=True
        )
        for p, a, b in zip(params, g_sparse, g_ref):
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_open_units_products_equal_the_dense_products():
    torch.manual_seed(1)
    codes = torch.relu(torch.randn(B, F) - 1.5)  # about 7% open, unsorted in nothing: row-major by construction
    units = OpenUnits.of(codes)
    assert units.idx.numel() == int((codes > 0).sum())
    W, G, X = torch.randn(F, D), torch.randn(B, D), torch.randn(B, D)
    vals = units.gather(codes)
    torch.testing.assert_close(units.decode(vals, W), codes @ W)
    torch.testing.assert_close(units.sample(G, W), (G @ W.T)[codes > 0])
    torch.testing.assert_close(units.scatter(vals, X), codes.T @ X)
    torch.testing.assert_close(units.sum_cols(vals), codes.sum(0))
    empty = OpenUnits.of(torch.zeros(B, F))
    assert empty.decode(empty.gather(codes), W).abs().sum() == 0 and empty.sample(G, W).numel() == 0
    assert empty.scatter(empty.gather(codes), X).abs().sum() == 0


def test_auto_mode_chooses_by_the_density_of_open_units():
    few = torch.zeros(300, 1000)
    few[:, :5] = 1.0  # 0.5% open
    x = torch.randn(300, 8)
    assert use_sparse(x, "auto", open_fraction(few))
    assert not use_sparse(x, "auto", open_fraction(torch.ones(300, 1000)))
    assert not use_sparse(x.bfloat16(), "auto", open_fraction(few))  # the CSR kernels are float32/float64 only here
    assert use_sparse(x, "sparse", 1.0) and not use_sparse(x, "dense", open_fraction(few))


def _affine(kind: str, open_fraction: float) -> torch.nn.Module:
    """TopK / BatchTopK with k = that fraction of F (some dead latents, so the auxiliary term is on), or a
    JumpReLU SAE whose θ opens about that fraction (and puts some units inside the kernel's band)."""
    torch.manual_seed(0)
    k = max(1, round(open_fraction * F)) if open_fraction > 0 else 1
    sae = {"topk": lambda: TopKSAE(D, F, k=k, k_aux=5), "batchtopk": lambda: BatchTopKSAE(D, F, k=k, k_aux=5),
           "jumprelu": lambda: JumpReLUSAE(D, F, bandwidth=0.2)}[kind]()  # fmt: skip
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
        if kind == "jumprelu":  # θ at the pre-activations' quantile: most units closed, a band of them near θ
            pre = (torch.randn(4000, D) - sae.b_dec) @ sae.W_enc.T + sae.b_enc
            q = {0.0: 1.0, 1.0: 0.0}.get(open_fraction, 1 - open_fraction)
            theta = pre.quantile(q, dim=0).clamp_min(1e-3) * (10.0 if open_fraction == 0.0 else 1.0)
            sae.log_threshold.copy_(theta.log() if open_fraction < 1.0 else torch.full((F,), -30.0))
        else:
            sae.set_dead(torch.arange(F) % 3 == 0)
    return sae


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("density", DENSITIES)
def test_affine_sparse_path_gives_the_dense_loss_and_gradients(kind, density):
    sae = _affine(kind, density)
    x = torch.randn(B, D)
    sparse, dense = sae.loss(x, 0.3, mode="sparse"), sae.loss_reference(x, 0.3)
    for name in ("total", "mse", "sparsity", "aux", "x_hat", "codes"):
        torch.testing.assert_close(getattr(sparse, name), getattr(dense, name), rtol=1e-5, atol=1e-5)
    if kind == "jumprelu" and 0 < density < 1:  # closed units inside the band: θ's gradient reaches them
        pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        assert ((pre <= sae.threshold) & (sae.threshold - pre <= sae.bandwidth / 2)).any()
    if kind != "jumprelu":
        assert float(dense.aux.detach()) > 0  # the auxiliary term is exercised
    params = [p for p in sae.parameters()]
    for term in ("total", "mse", "sparsity", "aux"):
        a_t, b_t = getattr(sae.loss(x, 0.3, mode="sparse"), term), getattr(sae.loss_reference(x, 0.3), term)
        if not b_t.requires_grad:
            continue
        g_sparse = torch.autograd.grad(a_t, params, allow_unused=True)
        g_dense = torch.autograd.grad(b_t, params, allow_unused=True)
        for p, a, b in zip(params, g_sparse, g_dense):
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_topk_auxiliary_term_with_fewer_dead_latents_than_k_aux():
    sae = _affine("topk", 0.05)
    sae.set_dead(torch.arange(F) < 3)  # 3 dead, k_aux = 5
    x = torch.randn(B, D)
    sparse, dense = sae.loss(x, mode="sparse"), sae.loss_reference(x)
    torch.testing.assert_close(sparse.aux, dense.aux)
    params = list(sae.parameters())
    for a, b in zip(torch.autograd.grad(sparse.total, params), torch.autograd.grad(dense.total, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sparse_path_is_not_taken_for_half_precision_autocast_or_other_shapes():
    sae = _affine("topk", 0.05)
    x = torch.randn(B, D)
    assert use_sparse(x, "auto", 0.01) and use_sparse(x, "sparse", 1.0)
    assert not use_sparse(x.bfloat16(), "sparse", 0.0) and not use_sparse(x[None], "sparse", 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_sparse(x, "sparse", 0.0)
        sae.loss(x)  # runs (dense) under autocast
    jump = _affine("jumprelu", 0.05)
    torch.testing.assert_close(jump.loss(x[None], 0.3).total, jump.loss_reference(x[None], 0.3).total)


def test_a_nan_pre_activation_reaches_the_jumprelu_loss_on_the_sparse_path():
    sae = _affine("jumprelu", 0.05)
    x = torch.randn(B, D)
    with torch.no_grad():
        sae.b_enc[7] = float("nan")
    assert sae.loss(x, 0.3, mode="sparse").total.isnan() and sae.loss_reference(x, 0.3).total.isnan()


@pytest.mark.parametrize("arch", ["relu", "gated", "topk", "batchtopk", "jumprelu"])
def test_training_ends_at_the_same_parameters_on_either_path(arch, tmp_path, monkeypatch):
    """Twelve Trainer steps (Adam, unit-norm rows, resampling off) with every step sparse, then every step dense."""
    torch.manual_seed(2)
    acts = torch.randn(12 * 64, D) @ torch.randn(D, D) * 0.3
    store_from_tensors(tmp_path / "acts", {"resid.0": acts})
    coefficient = {"topk": 8.0, "batchtopk": 8.0, "jumprelu": 0.3}.get(arch, 4.0)  # k = 8 of 80: 10% open
    finals = []
    for threshold in (2.0, -1.0):  # SPARSE_BELOW above every density: always sparse; below 0: always dense
        monkeypatch.setattr(fused, "SPARSE_BELOW", threshold)
        cfg = TrainConfig(store=str(tmp_path / "acts"), out=str(tmp_path / f"out{threshold}"), arch=(arch,),
                          coefficients=(coefficient,), expansion=F / D, tied=False, decoder_bias=True, lr=3e-3,
                          batch_size=64, resample_every=-1, device="cpu", seed=0)  # fmt: skip
        trainer = Trainer(cfg, progress=False)
        trainer.aux_dead_steps = 4  # TopK's auxiliary term gets dead latents within these steps
        for i in range(12):
            trainer.step({"resid.0": acts[i * 64 : (i + 1) * 64] * trainer.scales["resid.0"]})
        finals.append({k: v.clone() for k, v in trainer.runs[0].sae.state_dict().items()})
    assert finals[0].keys() == finals[1].keys()
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["relu-untied-bdec", "gated", "topk", "jumprelu"])
def test_sparse_path_on_cuda_equals_the_cpu(kind):
    """On the (fake) CUDA device the units are found with torch.nonzero/argsort, not NumPy; nothing mixes devices."""
    from fake_cuda import FakeCuda, fake_cuda

    sae = _sae(kind, 0.05) if kind in KINDS else _affine(kind, 0.05)
    x = torch.randn(B, D)
    want = sae.loss(x, 0.3, mode="sparse")
    want_grads = torch.autograd.grad(want.total, list(sae.parameters()), allow_unused=True)
    with fake_cuda():
        sae_cuda, x_cuda = sae.to("cuda"), x.to("cuda")
        got = sae_cuda.loss(x_cuda, 0.3, mode="sparse")
        assert isinstance(got.codes, FakeCuda) and got.codes.device.type == "cuda"
        got_grads = torch.autograd.grad(got.total, list(sae_cuda.parameters()), allow_unused=True)
        got_cpu = [None if g is None else g.cpu() for g in got_grads]
        total = got.total.cpu()
    torch.testing.assert_close(total, want.total)
    for a, b in zip(got_cpu, want_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_topk_auxiliary_term_takes_the_dense_path_past_the_threshold_with_the_same_loss_and_gradients():
    """k / d_sae under SPARSE_BELOW (sparse main path) but k_aux / n_dead over it: the auxiliary term is computed
    densely in "auto"; loss and gradients equal the reference's and the all-sparse path's."""
    from circuitsae.dictionaries import TopKSAE

    torch.manual_seed(4)
    sae = TopKSAE(32, 256, k=4)  # k / d_sae = 1.6%; k_aux = 16 of the 128 dead = 12.5% > SPARSE_BELOW
    assert 4 / 256 < fused.SPARSE_BELOW <= sae.k_aux / 128  # k_aux / n_dead
    dead = torch.zeros(256, dtype=torch.bool)
    dead[::2] = True
    sae.set_dead(dead)
    x = torch.randn(64, 32)
    params = list(sae.parameters())
    results = []
    for run in (lambda: sae.loss(x, mode="auto"), lambda: sae.loss(x, mode="sparse"), lambda: sae.loss_reference(x)):
        loss = run()
        grads = torch.autograd.grad(loss.total, params, allow_unused=True)
        results.append((loss, grads))
    (auto, g_auto), *others = results
    assert float(auto.aux.detach()) > 0
    for other, g_other in others:
        torch.testing.assert_close(auto.total, other.total, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(auto.aux, other.aux, rtol=1e-5, atol=1e-6)
        for a, b in zip(g_auto, g_other):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
