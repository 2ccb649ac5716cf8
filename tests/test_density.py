"""The AND systems are the density estimators written as functions of κ (Eq. 77).

For any κ with Σκ = 1, the increments the samplers record must be ``A κ + b`` plus a term common to
every model: that is what lets AND equalise them. Checked on random float64 inputs, against the
estimators themselves, with and without guidance.
"""

import pytest
import torch

from superdiff.density import (
    ito_final_step_system,
    ito_increment_system,
    ito_log_density_increment,
    ode_increment_system,
    ode_log_density_rate,
    transition_coefficients,
)
from superdiff.sampling import mix_denoised


def _inputs(m=3, batch=4, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    denoised = torch.randn(m, batch, d, generator=g, dtype=torch.float64)
    unconditional = torch.randn(batch, d, generator=g, dtype=torch.float64)
    x = torch.randn(batch, d, generator=g, dtype=torch.float64)
    kappa = torch.randn(batch, m, generator=g, dtype=torch.float64)
    return denoised, unconditional, x, kappa / kappa.sum(-1, keepdim=True), g


@pytest.mark.parametrize("guidance", [None, 4.0])
def test_ode_system_is_the_log_density_rate_of_kappa(guidance):
    denoised, unconditional, x, kappa, g = _inputs()
    divergence = torch.randn(denoised.shape[:2], generator=g, dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = 0.8, 0.6, -0.5, 0.7
    base, scale = (unconditional, guidance) if guidance else (denoised.mean(0), 1.0)
    a, b = ode_increment_system(denoised, base, scale, divergence, x, alpha, sigma, d_alpha, d_sigma)
    mix = mix_denoised(denoised, kappa, x, alpha, guidance, unconditional if guidance else None)
    rate = ode_log_density_rate(denoised, mix, divergence, x, alpha, sigma, d_alpha, d_sigma)
    torch.testing.assert_close(rate, (a @ kappa[..., None])[..., 0] + b, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("guidance", [None, 4.0])
def test_ito_system_is_the_log_density_increment_of_kappa_up_to_a_common_term(guidance):
    denoised, unconditional, x, kappa, g = _inputs()
    coef = transition_coefficients(0.7, 0.7, 0.8, 0.6)
    noise = coef.var**0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    base, scale = (unconditional, guidance) if guidance else (denoised.mean(0), 1.0)
    a, b = ito_increment_system(denoised, base, scale, noise, coef)
    mix = mix_denoised(denoised, kappa, x, coef.alpha_s, guidance, unconditional if guidance else None)
    residual = ito_log_density_increment(denoised, mix, x, noise, coef) - ((a @ kappa[..., None])[..., 0] + b)
    torch.testing.assert_close(residual, residual[:, :1].expand_as(residual), rtol=0, atol=1e-10)
    assert float(residual.std()) > 1e-3  # the common term is there, and differs between samples


@pytest.mark.parametrize("guidance", [None, 4.0])
def test_final_step_and_lands_equally_far_from_every_prediction(guidance):
    from superdiff.combine import and_weights

    denoised, unconditional, x, _, _ = _inputs(m=3)
    base, scale = (unconditional, guidance) if guidance else (denoised.mean(0), 1.0)
    a, b = ito_final_step_system(denoised, base, scale)
    kappa = and_weights(a, b)
    mix = mix_denoised(denoised, kappa, x, 1.0, guidance, unconditional if guidance else None)
    distances = (mix[None] - denoised).norm(dim=-1).T  # (B, M)
    torch.testing.assert_close(distances, distances[:, :1].expand_as(distances), rtol=1e-9, atol=0)
