"""diffusers pipelines on tiny seeded models (CPU, offline).

The central check: each pipeline's κ and log-density traces agree with an independent,
straightforward loop written here, which calls the network once per prompt plus once
unconditionally (as the authors' code does), reads σ and α straight from the scheduler's tables,
and evaluates the estimator as the Gaussian log-densities it is defined by (density.py):

    Δᵢ = log N(y; c_x x + c_0 x̂₀ⁱ, V) − log N(x; a y, S²),

with a = α_s/α_t, S² = σ_s² − a²σ_t², c_x = aσ_t²/σ_s², c_0 = α_t S²/σ_s², V = S², and the step
y = c_x x + c_0 x̂₀ᵐⁱˣ + w, w ~ N(0, V). AND's κ is solved here from Δᵢ − Δⱼ = 0, which after the
common k-term cancels is linear in y (hence in κ).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from superdiff.pipelines import SuperDiffPipeline
from superdiff.testing import tiny_sd_components

STEPS = 4
PROMPTS = ["a red circle", "a blue square"]


# ------------------------------------------------------------------------------------------------
# The independent reference loop
# ------------------------------------------------------------------------------------------------


def gaussian_log_pdf(y: torch.Tensor, mean: torch.Tensor, var: float) -> torch.Tensor:
    """Row-wise log N(y; mean, var I) of flattened (B, d) float64 tensors."""
    d = y.shape[-1]
    return -((y - mean) ** 2).sum(-1) / (2 * var) - 0.5 * d * math.log(2 * math.pi * var)


def reference_loop(denoise, grid, x, generator, mode, w, temperature=1.0, log_weights=None, states=None):
    """Algorithm 1, plainly. ``denoise(x, step, k)`` → x̂₀ of condition k (k = M is the
    unconditional one), ONE network call per condition. ``grid``: [(α, σ)] per time, the last σ = 0.

    ``states``: the pipeline's states after each step (from its callback). The loop still makes
    its own step, but continues from the pipeline's state (after checking they agree), so float
    rounding (batched vs per-prompt convolutions) cannot compound through AND's ratio of small
    differences; every κ and Δ is then compared at the same point.

    Returns (samples, log_density_trace (steps+1, B, M), kappa_trace (steps, B, M)).
    """
    batch = x.shape[0]
    m = denoise.num_prompts
    log_q = torch.zeros(batch, m, dtype=torch.float64)
    lw = torch.zeros(m, dtype=torch.float64) if log_weights is None else torch.tensor(log_weights, dtype=torch.float64)
    log_trace, kappa_trace = [log_q], []
    kappa = torch.full((batch, m), 1.0 / m, dtype=torch.float64)
    steps = len(grid) - 1
    for i in range(steps):
        (alpha_s, sigma_s), (alpha_t, sigma_t) = grid[i], grid[i + 1]
        x0 = torch.stack([denoise(x, i, k).reshape(batch, -1).double() for k in range(m)])  # (M, B, d)
        x0_u = denoise(x, i, m).reshape(batch, -1).double()
        xf = x.reshape(batch, -1).double()
        final = sigma_t == 0.0
        a = alpha_s / alpha_t
        s2 = sigma_s**2 - (a * sigma_t) ** 2
        c_x, c_0, var = a * sigma_t**2 / sigma_s**2, alpha_t * s2 / sigma_s**2, s2
        if not final:
            noise = math.sqrt(var) * torch.randn(x.shape, generator=generator).to(x.dtype)  # drawn in float32
            wf = noise.reshape(batch, -1).double()
        if mode == "or":
            kappa = torch.softmax(temperature * log_q + lw, dim=-1)
        elif mode == "average":
            kappa = torch.full((batch, m), 1.0 / m, dtype=torch.float64)
        elif mode == "sum":
            kappa = torch.ones(batch, m, dtype=torch.float64)
        elif mode == "and" and not final:
            # y(κ) = y0 + c_0 w Σⱼ κⱼ (x̂₀ʲ − x̂₀ᵘ);  Δᵢ − Δⱼ = (⟨y, μᵢ − μⱼ⟩ − ‖μᵢ‖²/2 + ‖μⱼ‖²/2)/V
            y0 = c_x * xf + c_0 * x0_u + wf
            mu = c_x * xf[None] + c_0 * x0  # (M, B, d)
            kappa = torch.empty(batch, m, dtype=torch.float64)
            for b in range(batch):
                lhs = torch.zeros(m + 1, m + 1, dtype=torch.float64)
                rhs = torch.zeros(m + 1, dtype=torch.float64)
                for r in range(m):
                    for j in range(m):
                        lhs[r, j] = c_0 * w * torch.dot(x0[j, b] - x0_u[b], mu[r, b]) / var
                    lhs[r, m] = -1.0
                    rhs[r] = -(torch.dot(y0[b], mu[r, b]) - 0.5 * torch.dot(mu[r, b], mu[r, b])) / var
                lhs[m, :m] = 1.0
                rhs[m] = 1.0
                kappa[b] = torch.linalg.solve(lhs, rhs)[:m]
        x0_mix = x0_u + w * ((kappa.T[:, :, None] * x0).sum(0) - kappa.sum(-1)[:, None] * x0_u)
        if final:
            x = x0_mix.to(x.dtype).reshape(x.shape)
        else:
            y = c_x * xf + c_0 * x0_mix + wf
            delta = torch.stack(
                [gaussian_log_pdf(y, c_x * xf + c_0 * x0[k], var) - gaussian_log_pdf(xf, a * y, s2) for k in range(m)], -1
            )
            log_q = log_q + delta
            x = y.to(x.dtype).reshape(x.shape)
            if states is not None:
                torch.testing.assert_close(x, states[i], rtol=1e-5, atol=1e-5 * (1 + float(x.abs().max())))
                x = states[i]
        log_trace.append(log_q)
        kappa_trace.append(kappa.clone())
    return x, torch.stack(log_trace), torch.stack(kappa_trace)


class PerConditionDenoiser:
    """Wraps ``x0(x, step, embedding_index)`` with the number of prompts."""

    def __init__(self, fn, num_prompts):
        self.fn, self.num_prompts = fn, num_prompts

    def __call__(self, x, step, k):
        return self.fn(x, step, k)


def assert_traces_match(out, ref_samples, ref_log, ref_kappa, samples, rtol):
    scale = 1.0 + float(ref_log.abs().max())
    assert out.log_density_trace.shape == ref_log.shape
    assert out.kappa_trace.shape == ref_kappa.shape
    torch.testing.assert_close(out.log_density_trace, ref_log, rtol=0, atol=rtol * scale)
    torch.testing.assert_close(out.kappa_trace.double(), ref_kappa, rtol=rtol, atol=rtol * (1 + float(ref_kappa.abs().max())))
    torch.testing.assert_close(samples.double(), ref_samples.double(), rtol=0, atol=10 * rtol * (1 + float(ref_samples.abs().max())))


def count_calls(module):
    """Count forward calls of a module (a pre-hook; returns the list whose length is the count)."""
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Stable Diffusion (ε, Euler)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    return SuperDiffPipeline(**tiny_sd_components(tokenizer_dir=tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def sd_pipe64(tmp_path_factory):
    """float64 throughout, so batched and per-prompt network calls agree to ~1e-15 and the traces
    can be compared tightly (AND's κ amplifies float32 rounding of x̂₀ about a thousandfold)."""
    return SuperDiffPipeline(**tiny_sd_components(tokenizer_dir=tmp_path_factory.mktemp("tok"))).to(torch.float64)


def encode_one(tokenizer, text_encoder, text):
    ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    return text_encoder(ids.input_ids)[0]


def run_with_states(pipe, *args, **kwargs):
    """Call the pipeline, recording its state after every step."""
    states = []
    out = pipe(*args, callback_on_step_end=lambda p, i, t, kw: states.append(kw["latents"].clone()), **kwargs)
    return out, states


def sd_reference(pipe, prompts, mode, w, batch, seed, negative="", vp=False, **kw):
    """Reference for SuperDiffPipeline: ε or v prediction; σ-form (Euler) or VP (DDIM/DDPM) grids."""
    sched = pipe.scheduler
    sched.set_timesteps(STEPS)
    abar = sched.alphas_cumprod.double()
    timesteps = [int(t) for t in sched.timesteps]
    if vp:  # x = sqrt(ᾱ) x₀ + sqrt(1 − ᾱ) ε
        grid = [(math.sqrt(abar[t]), math.sqrt(1 - abar[t])) for t in timesteps] + [(1.0, 0.0)]
    else:  # σ-form: x = x₀ + σ ε, σ = sqrt((1 − ᾱ)/ᾱ), network input x / sqrt(σ² + 1)
        grid = [(1.0, math.sqrt((1 - abar[t]) / abar[t])) for t in timesteps] + [(1.0, 0.0)]
    prediction = sched.config.prediction_type
    with torch.no_grad():
        embeddings = [encode_one(pipe.tokenizer, pipe.text_encoder, p) for p in list(prompts) + [negative]]

        def x0(x, i, k):
            alpha, sigma = grid[i]
            c_in = 1.0 / math.sqrt(alpha**2 + sigma**2)
            a_vp, s_vp = alpha * c_in, sigma * c_in
            x_vp = x * c_in
            out = pipe.unet(x_vp, torch.tensor(float(timesteps[i])), encoder_hidden_states=embeddings[k].expand(x.shape[0], -1, -1)).sample
            if prediction == "epsilon":
                return (x_vp - s_vp * out) / a_vp
            return a_vp * x_vp - s_vp * out  # v = α_VP ε − σ_VP x₀, α_VP² + σ_VP² = 1

        g = seeded(seed)
        shape = (batch, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
        x = float(sched.init_noise_sigma) * torch.randn(shape, generator=g).to(pipe.unet.dtype)
        return reference_loop(PerConditionDenoiser(x0, len(prompts)), grid, x, g, mode, w, **kw)


@pytest.mark.parametrize("mode", ["and", "or", "average", "sum"])
def test_sd_traces_match_independent_loop(sd_pipe64, mode):
    out, states = run_with_states(sd_pipe64, PROMPTS, mode=mode, num_inference_steps=STEPS, guidance_scale=5.0,
                                  num_images_per_prompt=2, generator=seeded(3), output_type="latent", progress=False)
    ref = sd_reference(sd_pipe64, PROMPTS, mode, 5.0, 2, 3, states=states)
    assert_traces_match(out, *ref, out.images, rtol=1e-8)


def test_sd_float32_or_with_temperature_and_bias_matches_independent_loop(sd_pipe):
    kw = dict(temperature=0.5, log_weights=[0.3, -0.2])
    out, states = run_with_states(sd_pipe, PROMPTS, mode="or", num_inference_steps=STEPS, guidance_scale=3.0,
                                  generator=seeded(1), output_type="latent", progress=False, **kw)
    ref = sd_reference(sd_pipe, PROMPTS, "or", 3.0, 1, 1, states=states, **kw)
    assert_traces_match(out, *ref, out.images, rtol=1e-4)


def test_sd_and_keeps_log_densities_equal_or_kappa_is_softmax(sd_pipe):
    three = PROMPTS + ["a green triangle"]
    out = sd_pipe(three, mode="and", num_inference_steps=6, generator=seeded(0), num_images_per_prompt=2, output_type="latent", progress=False)
    trace = out.log_density_trace
    spread = (trace - trace.mean(-1, keepdim=True)).abs().max()
    assert float(spread) < 1e-6 * (1 + float(trace.abs().max()))
    assert float(trace[-1].abs().min()) > 1.0  # the densities did move
    out = sd_pipe(three, mode="or", num_inference_steps=6, generator=seeded(0), num_images_per_prompt=2, output_type="latent", progress=False)
    torch.testing.assert_close(out.kappa_trace.double(), torch.softmax(out.log_density_trace[:-1], -1), rtol=1e-5, atol=1e-6)
    assert float((out.kappa_trace - 1 / 3).abs().max()) > 1e-3  # OR did reweight


def test_sd_shapes_outputs_and_determinism(sd_pipe):
    kw = dict(mode="and", num_inference_steps=3, num_images_per_prompt=2, progress=False)
    a = sd_pipe(PROMPTS, generator=seeded(7), output_type="pt", **kw)
    b = sd_pipe(PROMPTS, generator=seeded(7), output_type="pt", **kw)
    c = sd_pipe(PROMPTS, generator=seeded(8), output_type="pt", **kw)
    assert a.images.shape == (2, 3, 16, 16)
    assert a.log_densities.shape == (2, 2) and a.log_density_trace.shape == (4, 2, 2) and a.kappa_trace.shape == (3, 2, 2)
    assert torch.equal(a.images, b.images) and torch.equal(a.log_density_trace, b.log_density_trace)
    assert not torch.equal(a.images, c.images)
    assert torch.isfinite(a.log_density_trace).all() and torch.isfinite(a.images).all()
    pil = sd_pipe(PROMPTS, generator=seeded(7), output_type="pil", **kw).images
    assert len(pil) == 2 and pil[0].size == (16, 16)
    arr = sd_pipe(PROMPTS, generator=seeded(7), output_type="np", **kw).images
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 16, 16, 3)
    big = sd_pipe(PROMPTS, generator=seeded(7), output_type="latent", height=32, width=24, **kw).images
    assert big.shape == (2, 4, 16, 12)


def test_sd_one_batched_network_call_per_step(sd_pipe):
    sizes = []
    handle = sd_pipe.unet.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    try:
        sd_pipe(PROMPTS + ["a cat"], mode="or", num_inference_steps=5, num_images_per_prompt=2, output_type="latent", progress=False)
    finally:
        handle.remove()
    assert sizes == [(3 + 1) * 2] * 5
