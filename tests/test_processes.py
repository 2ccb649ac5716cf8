"""Processes: derivatives, the forward SDE they imply, diffusers schedules, and output conversions."""

import pytest
import torch

from superdiff.processes import (
    EDM,
    PREDICTIONS,
    DiscreteSigma,
    DiscreteVP,
    RectifiedFlow,
    VarianceExploding,
    VPCosine,
    VPLinear,
    VPLinearSigmaT,
    from_denoised,
    to_denoised,
)

PROCESSES = [VPLinear(), VPLinearSigmaT(), VPCosine(), VarianceExploding(0.01, 50.0), EDM(), RectifiedFlow()]
TIMES = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=torch.float64)


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
def test_time_derivatives_match_finite_differences(process):
    h = 1e-6
    for f, df in ((process.alpha, process.d_alpha), (process.sigma, process.d_sigma)):
        numeric = (f(TIMES + h) - f(TIMES - h)) / (2 * h)
        torch.testing.assert_close(df(TIMES), numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
def test_forward_sde_reproduces_the_marginal_variance(process):
    # x_t = α x0 + σ ε solves dx = f x dt + g dW iff d(σ²)/dt = 2 f σ² + g² (and dα/dt = f α).
    s = process.sigma(TIMES)
    lhs = 2 * s * process.d_sigma(TIMES)
    rhs = 2 * process.drift_coefficient(TIMES) * s * s + process.diffusion_squared(TIMES)
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(process.d_alpha(TIMES), process.drift_coefficient(TIMES) * process.alpha(TIMES))


def test_the_authors_cifar_schedule_has_sigma_t_and_their_g_squared():
    p = VPLinearSigmaT()
    torch.testing.assert_close(p.sigma(TIMES), TIMES)
    torch.testing.assert_close(p.alpha(TIMES), VPLinear().alpha(TIMES))
    beta = 1 + 0.5 * TIMES * 0.1 + 0.5 * TIMES**2 * (20.0 - 0.1)  # the authors' code: g² = 2 σ_t β(t)
    torch.testing.assert_close(p.diffusion_squared(TIMES), 2 * TIMES * beta)


def test_flow_has_pure_noise_at_one_and_data_at_zero():
    p = RectifiedFlow()
    assert float(p.alpha(1.0)) == 0.0 and float(p.sigma(1.0)) == 1.0
    assert float(p.alpha(0.0)) == 1.0 and float(p.sigma(0.0)) == 0.0


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_prediction_round_trip(process, prediction):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, generator=g, dtype=torch.float64)
    for t in TIMES:
        a, s = process.alpha(t), process.sigma(t)
        da, ds = process.d_alpha(t), process.d_sigma(t)
        x = a * x0 + s * eps
        out = from_denoised(x0, prediction, x, a, s, da, ds)
        torch.testing.assert_close(to_denoised(out, prediction, x, a, s, da, ds), x0)
    # and each output means what its name says, at one time
    t = TIMES[1]
    a, s, da, ds = process.alpha(t), process.sigma(t), process.d_alpha(t), process.d_sigma(t)
    x = a * x0 + s * eps
    expected = {
        "epsilon": eps,
        "sample": x0,
        "v_prediction": a * eps - s * x0,
        "flow": da * x0 + ds * eps,
        "score": -eps / s,
        "scaled_score": -eps,
    }[prediction]
    torch.testing.assert_close(from_denoised(x0, prediction, x, a, s, da, ds), expected)


def test_discrete_schedules_match_diffusers():
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    ddpm = DDPMScheduler(beta_schedule="linear")
    vp = DiscreteVP.from_scheduler(ddpm)
    k = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(vp.alpha(vp.time_of_timestep(k)), ddpm.alphas_cumprod[k].double().sqrt())
    torch.testing.assert_close(vp.sigma(vp.time_of_timestep(k)), (1 - ddpm.alphas_cumprod[k].double()).sqrt())
    euler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    ve = DiscreteSigma.from_scheduler(euler)
    # diffusers keeps its training sigmas in reverse order (noise first)
    train_sigmas = ((1 - euler.alphas_cumprod) / euler.alphas_cumprod).sqrt()
    torch.testing.assert_close(ve.sigma(ve.time_of_timestep(k)), train_sigmas[k].double(), rtol=1e-6, atol=0)
    assert float(ve.alpha(0.3)) == 1.0
    torch.testing.assert_close(ve.timestep(ve.time_of_timestep(k)), k.double())
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiscreteVP(torch.tensor([0.5]))
