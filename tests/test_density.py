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
    ito_quadratic_increment_system,
    ode_increment_system,
    ode_log_density_rate,
    step_moments,
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


def _or_density_error(models, steps: int, density_variance: str | None, samples: int = 256) -> float:
    """Median |tracked − exact| log q of OR from exact log q at t = 1; ``density_variance=None``: the default."""
    from superdiff import Or, prior_sample, sample_sde
    from superdiff.time_grids import uniform_time_grid

    g = torch.Generator().manual_seed(0)
    x = prior_sample(models, samples, models.sample_shape, generator=g, dtype=torch.float64)
    times = uniform_time_grid(models.process, steps)
    chosen = {} if density_variance is None else {"density_variance": density_variance}
    out = sample_sde(models, x, times, Or(), log_q_init=models.log_prob(x, times[0]), generator=g, **chosen)
    return float((out.log_densities - models.log_prob(out.samples, times[-1])).abs().median())


def test_the_tweedie_variance_cuts_the_few_step_density_error_with_no_extra_network_call():
    """Each model's own kernel variance β̃ + c₀²(σ²/α)λ̂, λ̂ the Jacobian trace read from the previous
    step's residual: on exact mixtures its median error at 20 steps is a quarter (or less) of the default's,
    it still falls with the steps, and it does not lose at 200 steps. Measured (seed 0, 256 samples): 3-D VP
    1.34 → 0.25 at 20 steps, 0.77 → 0.13 at 50, 0.25 → 0.05 at 200; 8-D VE 4.31 → 0.82 at 20. One network
    call per step."""
    from superdiff import GaussianMixture, MixtureDenoiser, VarianceExploding, VPLinear

    g = torch.Generator().manual_seed(1)
    pair = lambda d: (GaussianMixture.create(torch.randn(3, d, generator=g) * 1.5, 0.3, [0.5, 0.3, 0.2]),  # noqa: E731
                      GaussianMixture.create(torch.randn(2, d, generator=g) * 1.5, 0.4))
    vp, ve = MixtureDenoiser(pair(3), VPLinear(0.1, 20.0)), MixtureDenoiser(pair(8), VarianceExploding())
    for models, worst in ((vp, 0.4), (ve, 1.5)):
        default, tweedie = _or_density_error(models, 20, "forward"), _or_density_error(models, 20, "tweedie")
        assert tweedie < min(worst, 0.25 * default), (type(models.process).__name__, default, tweedie)
    errors = [_or_density_error(vp, n, "tweedie") for n in (20, 50, 200)]
    assert errors[0] > errors[1] > errors[2] and errors[2] <= _or_density_error(vp, 200, "forward"), errors
    calls = []

    class Counting(MixtureDenoiser):
        def __call__(self, x, t):
            calls.append(1)
            return super().__call__(x, t)

    _or_density_error(Counting(vp.mixtures, vp.process), 20, "tweedie", samples=8)
    assert len(calls) == 20


def _pair(dim: int):
    """bench/variance.py's random_mixtures: a 3-component mixture with unequal weights and a 2-component one."""
    from superdiff import GaussianMixture

    g = torch.Generator().manual_seed(1)
    return (GaussianMixture.create(torch.randn(3, dim, generator=g) * 1.5, 0.3, [0.5, 0.3, 0.2]),
            GaussianMixture.create(torch.randn(2, dim, generator=g) * 1.5, 0.4))


@pytest.mark.parametrize("setup, at_50", [("2-D VP", 0.3), ("3-D cosine", 0.3), ("3-D EDM", 0.3), ("3-D flow", 0.3),
                                          ("8-D VP", 0.45), ("8-D flow", 0.45)])
def test_the_default_estimator_meets_the_few_step_goal_on_every_process(setup, at_50):
    """Issue 16's acceptance on exact mixtures, for the default density_variance ("tweedie"): median
    |tracked − exact| log q of OR ≤ 1 nat at 20 steps and ≤ 0.3 at 50 (the 8-D rows miss 0.3: the README's
    table states 0.34–0.46 there), falling with the steps, and no worse than the common-variance "forward"
    at 1000 steps. Measured (seed 0, 256 samples), default at 20 / 50 / 200 / 1000 (forward at 1000): 2-D VP
    0.30 / 0.15 / 0.06 / 0.026 (0.087); 3-D cosine 0.17 / 0.10 / 0.05 / 0.018 (0.065); 3-D EDM 0.30 / 0.17 /
    0.07 / 0.032 (0.104); 3-D flow 0.17 / 0.11 / 0.04 / 0.019 (0.070); 8-D VP 0.66 / 0.40 / 0.14 / 0.071
    (0.345); 8-D flow 0.63 / 0.36 / 0.18 / 0.075 (0.235)."""
    from superdiff import EDM, MixtureDenoiser, RectifiedFlow, VPCosine, VPLinear
    from superdiff.toy import figure2_models

    dim, process = {"2-D VP": (2, VPLinear(0.1, 20.0)), "3-D cosine": (3, VPCosine()), "3-D EDM": (3, EDM()),
                    "3-D flow": (3, RectifiedFlow()), "8-D VP": (8, VPLinear(0.1, 20.0)),
                    "8-D flow": (8, RectifiedFlow())}[setup]
    models = MixtureDenoiser(figure2_models().mixtures if dim == 2 else _pair(dim), process)
    errors = [_or_density_error(models, n, None) for n in (20, 50, 200, 1000)]
    assert errors[0] <= 1.0 and errors[1] <= at_50, errors
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[3] <= _or_density_error(models, 1000, "forward"), errors


@pytest.mark.parametrize("guidance", [None, 4.0])
def test_the_per_model_variance_system_is_the_estimators_increment_for_every_kappa(guidance):
    """With one estimator variance per model and sample the increments are quadratic in κ. For any κ with
    Σκ = 1, the estimator's own increments equal A κ + b + r φ(κ) up to a term common to every model, and
    the rows' quadratic part is really there (the common-variance system alone misses them)."""
    denoised, unconditional, x, _, g = _inputs()
    coef = transition_coefficients(0.7, 0.7, 0.8, 0.6)
    noise = coef.var**0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    var = coef.density_var * (0.5 + torch.rand(denoised.shape[:2], generator=g, dtype=torch.float64))  # (M, B)
    base, scale = (unconditional, guidance) if guidance else (denoised.mean(0), 1.0)
    system = ito_quadratic_increment_system(step_moments(denoised, base, noise), scale, coef, var)
    for _ in range(4):  # κ of all sizes, summing to one
        kappa = 3 * torch.randn(denoised.shape[1], denoised.shape[0], generator=g, dtype=torch.float64)
        kappa = kappa - kappa.mean(-1, keepdim=True) + 1 / kappa.shape[-1]
        mix = mix_denoised(denoised, kappa, x, coef.alpha_s, guidance, unconditional if guidance else None)
        increments = ito_log_density_increment(denoised, mix, x, noise, coef, var)
        rows = (system.increment_matrix @ kappa[..., None])[..., 0] + system.increment_offset
        residual = increments - (rows + system.row_weights * system.phi(kappa)[:, None])
        torch.testing.assert_close(residual, residual[:, :1].expand_as(residual), rtol=0, atol=1e-9)
        without = increments - rows
        assert float((without - without[:, :1]).abs().max()) > 1e-3


def test_and_with_each_models_own_variance_keeps_the_tracked_densities_equal_and_narrows_the_exact_gap():
    """AND under the default "tweedie" variance: solving the quadratic equal-density condition keeps every
    sample's tracked log-densities equal at every step (a sample where it fails scores that step with one
    common variance), and the samples' exact gap |log q₁ − log q₂| at the last tracked
    time is well below the common-variance estimator's. Measured (seed 0, 256 samples): 8-D VP at 25 steps,
    median gap 2.91 → 0.71; 3-D VP at 100 steps 0.23 → 0.16."""
    from superdiff import And, MixtureDenoiser, VPLinear, prior_sample, sample_sde

    def exact_gap(models, steps, density_variance):
        gen = torch.Generator().manual_seed(0)
        x = prior_sample(models, 256, models.sample_shape, generator=gen, dtype=torch.float64)
        times = models.process.time_grid(steps)
        out = sample_sde(models, x, times, And(), generator=gen, density_variance=density_variance)
        tracked = out.log_density_trace
        assert float((tracked[..., 0] - tracked[..., 1]).abs().max()) < 1e-9 * (1 + float(tracked.abs().max()))
        exact = models.log_prob(out.samples, times[-1])
        return float((exact[:, 0] - exact[:, 1]).abs().median())

    for dim, steps, ratio in ((8, 25, 0.5), (3, 100, 0.8)):
        models = MixtureDenoiser(_pair(dim), VPLinear(0.1, 20.0))
        forward, tweedie = exact_gap(models, steps, "forward"), exact_gap(models, steps, "tweedie")
        assert tweedie < ratio * forward, (dim, steps, forward, tweedie)
