"""Metrics against hand-computed values (REFERENCE §3)."""

import math

import pytest
import torch

from circuitsae import metrics


def test_l0_counts_nonzero_codes_per_row():
    codes = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, -1.0, 0.5]])
    assert metrics.l0(codes) == pytest.approx((2 + 0 + 3) / 3)


def test_fvu_uses_variance_about_the_mean():
    x = torch.tensor([[1.0, 10.0], [3.0, 14.0]])  # per-dimension means (2, 12)
    x_hat = torch.tensor([[1.0, 11.0], [2.0, 14.0]])
    # squared error 0 + 1 + 1 + 0 = 2; variance about the mean 1 + 4 + 1 + 4 = 10
    assert metrics.fvu(x, x_hat) == pytest.approx(0.2)
    assert metrics.explained_variance(x, x_hat) == pytest.approx(0.8)
    # predicting the mean explains nothing; about zero it would look like 0.02
    assert metrics.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)


def test_gamma_is_one_for_a_perfect_reconstruction_and_below_for_a_shrunk_one():
    x = torch.randn(100, 16)
    assert metrics.relative_reconstruction_bias(x, x) == pytest.approx(1.0)
    assert metrics.relative_reconstruction_bias(x, 0.8 * x) == pytest.approx(0.8)
    # hand case: x = (1, 0), x̂ = (0.5, 0.5): E||x̂||² = 0.5, E[x·x̂] = 0.5 -> 1
    assert metrics.relative_reconstruction_bias(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])) == 1.0


def test_density_dead_and_dense():
    codes = torch.zeros(20, 4)
    codes[:, 0] = 1.0  # always on -> dense
    codes[:2, 1] = 1.0  # 10% -> not dense (threshold is "more than 10%")
    codes[:1, 2] = 1.0  # 5%
    density = metrics.feature_density(codes)
    torch.testing.assert_close(density, torch.tensor([1.0, 0.1, 0.05, 0.0]))
    assert metrics.dead_fraction(density) == 0.25
    assert metrics.dense_fraction(density) == 0.25
    hist = metrics.density_histogram(density, bins=8, low=-8)
    assert hist["dead"] == 1 and sum(hist["counts"]) == 3


def test_cross_entropy_and_kl_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]]))
    ids = torch.tensor([[0, 1, 2]])  # predict 1 from position 0, 2 from position 1
    expected = -(math.log(0.25) + math.log(0.8)) / 2
    assert float(metrics.cross_entropy(logits, ids)) == pytest.approx(expected, rel=1e-6)
    assert float(metrics.cross_entropy(logits, ids, first=1)) == pytest.approx(-math.log(0.8), rel=1e-6)
    p, q = torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.9, 0.1]))
    assert float(metrics.kl_divergence(p, q)) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert float(metrics.kl_divergence(p, p)) == 0.0


def test_loss_recovered_formula():
    assert metrics.loss_recovered(ce_clean=2.0, ce_spliced=2.5, ce_zero=7.0) == pytest.approx(0.9)
    assert metrics.loss_recovered(2.0, 2.0, 7.0) == 1.0 and metrics.loss_recovered(2.0, 7.0, 7.0) == 0.0


def test_streaming_stats_equal_the_pure_functions():
    x = torch.randn(1000, 8) * 3 + 1
    codes = torch.relu(torch.randn(1000, 32) - 1)
    x_hat = 0.9 * x + 0.1 * torch.randn_like(x)
    stats = metrics.ReconstructionStats()
    for i in range(0, 1000, 300):
        stats.update(x[i : i + 300], x_hat[i : i + 300], codes[i : i + 300])
    s = stats.summary()
    assert s["fvu"] == pytest.approx(metrics.fvu(x, x_hat), rel=1e-9)
    assert s["gamma"] == pytest.approx(metrics.relative_reconstruction_bias(x, x_hat), rel=1e-9)
    assert s["l0"] == pytest.approx(metrics.l0(codes), rel=1e-9)
    density = metrics.feature_density(codes)
    assert s["dead_fraction"] == metrics.dead_fraction(density)
    assert s["dense_fraction"] == metrics.dense_fraction(density)
