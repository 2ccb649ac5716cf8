"""Time grids: their ends and order on every process, the spacing each promises, refusals, and one
measured gain of the Itô estimator on an exact mixture."""

import math

import pytest
import torch

from superdiff import GaussianMixture, MixtureDenoiser, Or, prior_sample, sample_sde
from superdiff.processes import (
    EDM,
    DiscreteSigma,
    DiscreteVP,
    RectifiedFlow,
    VarianceExploding,
    VPCosine,
    VPLinear,
    VPLinearSigmaT,
)
from superdiff.time_grids import (
    GRIDS,
    edm_time_grid,
    log_snr,
    log_snr_time_grid,
    quadratic_time_grid,
    uniform_time_grid,
)

# DDPM's linear β (1e-4 → 0.02 over 1000 steps), built here so no diffusers scheduler is needed.
ABAR = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
PROCESSES = [
    VPLinear(),
    VPLinearSigmaT(),
    VPCosine(),
    VarianceExploding(0.01, 50.0),
    EDM(),
    RectifiedFlow(),
    DiscreteVP(ABAR),
    DiscreteSigma(ABAR),
]
# A flow's α vanishes at t = 1, where log-SNR and σ/α are infinite: those grids start below it.
T_START = {RectifiedFlow: 0.999}


def _start(name, process):
    return T_START.get(type(process), process.t_max) if name in ("log_snr", "edm") else process.t_max


@pytest.mark.parametrize("name", sorted(GRIDS))
@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
def test_every_grid_runs_from_the_start_to_t_min_ever_less_noisy(process, name):
    steps = 12
    start = _start(name, process)
    times = GRIDS[name](process, steps, t_start=start)
    assert times.dtype == torch.float64 and times.shape == (steps + 1,)
    assert float(times[0]) == start and float(times[-1]) == process.t_min
    assert bool((times[1:] < times[:-1]).all())
    ratio = process.sigma(times) / process.alpha(times)  # the samplers need σ/α strictly decreasing
    assert bool((ratio[1:] < ratio[:-1]).all()) and float(process.sigma(times[-1])) > 0
    # ... and the sampler takes it as it is.
    models = MixtureDenoiser((GaussianMixture.create([[0.5]], 0.3), GaussianMixture.create([[-1.0]], 0.5)), process)
    x = prior_sample(models, 3, (1,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample_sde(models, x, times, Or(), generator=torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(out.samples).all() and torch.isfinite(out.log_densities).all())


@pytest.mark.parametrize("process", [p for p in PROCESSES if type(p) is not RectifiedFlow],
                         ids=lambda p: type(p).__name__)
def test_the_log_snr_grid_has_equal_log_snr_gaps(process):
    steps = 20
    lam = log_snr(process, log_snr_time_grid(process, steps))
    gaps = lam[1:] - lam[:-1]
    expected = (float(log_snr(process, process.t_min)) - float(log_snr(process, process.t_max))) / steps
    torch.testing.assert_close(gaps, torch.full_like(gaps, expected), rtol=0, atol=1e-9)


def test_the_log_snr_grid_of_vp_linear_is_the_closed_form_inverse():
    # λ = log α² − log(1 − α²) with log α² = −½ t² (β₁ − β₀) − t β₀: solve the quadratic for t.
    process, steps = VPLinear(0.1, 20.0), 15
    lam_ends = log_snr(process, torch.tensor([process.t_max, process.t_min], dtype=torch.float64))
    lam = torch.linspace(float(lam_ends[0]), float(lam_ends[1]), steps + 1, dtype=torch.float64)
    log_a2 = -torch.log1p(torch.exp(-lam))  # α² = sigmoid(λ)
    b1, b0 = process.beta_max, process.beta_min
    t = (-b0 + torch.sqrt(b0 * b0 - 2.0 * (b1 - b0) * log_a2)) / (b1 - b0)
    torch.testing.assert_close(log_snr_time_grid(process, steps), t, rtol=0, atol=1e-12)


def test_on_ve_the_log_snr_grid_is_the_uniform_one():
    process = VarianceExploding(0.01, 50.0)  # log σ is linear in t
    torch.testing.assert_close(log_snr_time_grid(process, 17), uniform_time_grid(process, 17), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rho", [1.0, 3.0, 7.0])
@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
def test_the_edm_grid_follows_karras_eq_5_on_sigma_over_alpha(process, rho):
    steps = 18
    t_start = T_START.get(type(process), process.t_max)
    times = edm_time_grid(process, steps, rho, t_start=t_start)
    ratio = process.sigma(times) / process.alpha(times)
    r_max = float(process.sigma(t_start) / process.alpha(t_start))
    r_min = float(process.sigma(process.t_min) / process.alpha(process.t_min))
    i = torch.arange(steps + 1, dtype=torch.float64)
    eq5 = (r_max ** (1 / rho) + i / steps * (r_min ** (1 / rho) - r_max ** (1 / rho))) ** rho  # N − 1 = steps
    torch.testing.assert_close(ratio, eq5, rtol=1e-9, atol=0)


def test_on_edm_the_edm_grid_is_the_uniform_one():
    process = EDM(0.002, 80.0, 7.0)  # σ_t is Eq. 5 with t = 1 − i/(N − 1)
    torch.testing.assert_close(edm_time_grid(process, 18, 7.0), uniform_time_grid(process, 18), rtol=0, atol=1e-12)
    assert not torch.allclose(edm_time_grid(process, 18, 3.0), uniform_time_grid(process, 18))


def test_the_quadratic_grid_is_ddims_quadratic_spacing():
    process, steps = VPLinear(), 10
    u = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    expected = process.t_min + (process.t_max - process.t_min) * u * u
    torch.testing.assert_close(quadratic_time_grid(process, steps), expected, rtol=0, atol=1e-15)


def test_custom_ends_are_kept_exactly():
    process = VPLinear()
    for name in GRIDS:
        times = GRIDS[name](process, 7, t_start=0.8, t_end=0.05)
        assert float(times[0]) == 0.8 and float(times[-1]) == 0.05 and bool((times[1:] < times[:-1]).all())


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "20", None])
def test_bad_steps_are_refused(steps):
    for name in GRIDS:
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            GRIDS[name](VPLinear(), steps)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(t_start=0.2, t_end=0.5), "0 <= t_end < t_start <= t_max"),
        (dict(t_start=0.3, t_end=0.3), "0 <= t_end < t_start <= t_max"),
        (dict(t_start=1.5), "t_max = 1.0"),
        (dict(t_end=-0.1), "0 <= t_end"),
        (dict(t_end=float("nan")), "0 <= t_end"),
        (dict(t_end=0.0), "σ > 0"),  # VP: σ_0 = 0, no density to track there
    ],
)
def test_bad_ends_are_refused(kwargs, match):
    for name in GRIDS:
        with pytest.raises(ValueError, match=match):
            GRIDS[name](VPLinear(), 10, **kwargs)


def test_a_flow_from_t_1_has_no_log_snr_or_edm_grid_and_says_what_to_pass():
    for grid in (log_snr_time_grid, edm_time_grid):
        with pytest.raises(ValueError, match="pass t_start < 1"):
            grid(RectifiedFlow(), 10)
    assert float(uniform_time_grid(RectifiedFlow(), 10)[0]) == 1.0  # uniform and quadratic need no λ


@pytest.mark.parametrize("rho", [0.0, -7.0, math.inf, math.nan, True, "7"])
def test_bad_rho_is_refused(rho):
    with pytest.raises(ValueError, match="rho must be a finite number > 0"):
        edm_time_grid(VPLinear(), 10, rho)


def test_a_denoiser_instead_of_its_process_is_refused_with_a_hint():
    models = MixtureDenoiser((GaussianMixture.create([[0.0]], 1.0),), VPLinear())
    with pytest.raises(ValueError, match=r"a denoiser's is its \.process"):
        uniform_time_grid(models, 10)


def test_the_quadratic_grid_cuts_the_ito_estimators_error_at_20_steps_on_vp():
    # bench/few_steps.py's "3-D, unequal weights, VP linear" set-up, OR from exact log q at t = 1.
    # Measured (seed 0, 512 samples): median |tracked − exact| 1.307 nats on the uniform grid, 1.023 on the
    # quadratic one (ratio 0.78; over seeds 0–7 uniform 1.24–1.35, quadratic 0.99–1.02, ratio ≤ 0.80).
    g = torch.Generator().manual_seed(1)
    a = GaussianMixture.create(torch.randn(3, 3, generator=g) * 1.5, 0.3, [0.5, 0.3, 0.2])
    b = GaussianMixture.create(torch.randn(2, 3, generator=g) * 1.5, 0.4)
    models = MixtureDenoiser((a, b), VPLinear(0.1, 20.0))

    def error(times):
        gen = torch.Generator().manual_seed(0)
        x = prior_sample(models, 512, (3,), generator=gen, dtype=torch.float64)
        out = sample_sde(models, x, times, Or(), log_q_init=models.log_prob(x, times[0]), generator=gen,
                         density_variance="forward")  # the grid's effect on the common-variance estimator
        return float((out.log_densities - models.log_prob(out.samples, times[-1])).abs().median())

    uniform, quadratic = error(uniform_time_grid(models.process, 20)), error(quadratic_time_grid(models.process, 20))
    assert quadratic < 0.87 * uniform and quadratic < 1.15, (uniform, quadratic)
