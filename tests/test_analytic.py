"""Exact Gaussian mixtures: normalised densities, autograd-consistent scores, Tweedie's formula."""

import pytest
import torch

from superdiff.analytic import GaussianMixture
from superdiff.processes import RectifiedFlow, VPLinear


def test_log_prob_integrates_to_one_in_1d():
    mix = GaussianMixture.create([[-1.0], [2.0]], torch.tensor([0.3, 0.5]), [0.3, 0.7])
    grid = torch.linspace(-12, 12, 20001, dtype=torch.float64)[:, None]
    for a, s in ((1.0, 0.0), (0.6, 0.8), (0.05, 1.0)):
        dens = mix.log_prob(grid, a, s).exp()
        assert abs(float(torch.trapezoid(dens, grid[:, 0])) - 1.0) < 1e-6


def test_score_is_the_gradient_of_log_prob_and_denoised_follows_tweedie():
    mix = GaussianMixture.create(
        [[0.0, 1.0], [1.0, -1.0], [-2.0, 0.5]], torch.tensor([[0.2, 0.5], [0.4, 0.4], [0.1, 0.3]]), [0.2, 0.5, 0.3]
    )
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_(True)
    a, s = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    (grad,) = torch.autograd.grad(mix.log_prob(x, a, s).sum(), x)
    torch.testing.assert_close(mix.score(x, a, s), grad)
    torch.testing.assert_close(mix.denoised(x, a, s), (x + s * s * grad) / a)


def test_denoised_is_finite_where_alpha_vanishes():
    mix = GaussianMixture.create([[1.0, 1.0], [-1.0, 3.0]], 0.4, [0.25, 0.75])
    x = torch.randn(8, 2, dtype=torch.float64)
    p = RectifiedFlow()
    # at pure noise the posterior mean is the data mean
    torch.testing.assert_close(
        mix.denoised(x, p.alpha(1.0), p.sigma(1.0)), torch.tensor([[-0.5, 2.5]], dtype=torch.float64).expand(8, 2)
    )


def test_sampling_matches_the_weights():
    mix = GaussianMixture.create([[-5.0], [5.0]], 0.1, [0.8, 0.2])
    x = mix.sample(20000, torch.Generator().manual_seed(0))
    assert abs(float((x[:, 0] < 0).double().mean()) - 0.8) < 0.015


def test_bad_mixtures_are_rejected():
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture.create([[0.0], [1.0]], 0.1, [0.5, 0.6])
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture.create([[0.0], [1.0]], torch.ones(3))
    with pytest.raises(ValueError, match="means"):
        GaussianMixture.create([0.0, 1.0], 0.1)
    with pytest.raises(ValueError, match="weights"):  # float32 rounding is tolerated, a real gap is not
        GaussianMixture.create([[0.0], [1.0], [2.0]], 0.1, torch.tensor([0.3, 0.3, 0.3]))


def test_float32_weights_are_accepted_and_renormalised():
    weights = torch.softmax(torch.tensor([0.1, 0.7, -0.4]), 0)  # float32: sums to 1 within its rounding
    mix = GaussianMixture.create([[0.0], [1.0], [2.0]], 0.1, weights)
    assert mix.weights.dtype == torch.float64 and abs(float(mix.weights.sum()) - 1.0) < 1e-15
    torch.testing.assert_close(mix.weights, weights.double(), rtol=1e-6, atol=0)
    GaussianMixture.create([[0.0], [1.0], [2.0]], 0.1, torch.full((3,), 1 / 3))
    VPLinear()  # keep import used
