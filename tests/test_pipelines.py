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
from torch.ops import aten
from torch.utils._python_dispatch import TorchDispatchMode

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
        xf = x.reshape(batch, -1).double()
        # guided: x̂₀ᵐⁱˣ = x̂₀ᵘ + w(Σκx̂₀ʲ − Σκ x̂₀ᵘ); unguided: Σκx̂₀ʲ + (1 − Σκ) x/α (a zero score's x̂₀).
        # Unguided, base only shifts AND's system, whose y(κ) does not depend on it when Σκ = 1; a base
        # near the x̂₀ⁱ (their mean) keeps float64 from cancelling ‖x̂₀‖² away, as x̂₀ᵘ does when guided.
        base, scale = (denoise(x, i, m).reshape(batch, -1).double(), w) if w is not None else (x0.mean(0), 1.0)
        final = sigma_t == 0.0
        a = alpha_s / alpha_t
        s2 = sigma_s**2 - (a * sigma_t) ** 2
        c_x, c_0 = a * sigma_t**2 / sigma_s**2, alpha_t * s2 / sigma_s**2
        var = sigma_t**2 * s2 / sigma_s**2  # the step's kernel: DDPM's β̃ (the samplers' default)
        var_est = s2 * (alpha_t**2 + sigma_t**2) / (alpha_s**2 + sigma_s**2)  # the estimator's: β in the VP frame
        if not final:
            noise = math.sqrt(var) * torch.randn(x.shape, generator=generator).to(x.dtype)  # drawn in float32
            wf = noise.reshape(batch, -1).double()
        if mode == "or":
            kappa = torch.softmax(temperature * log_q + lw, dim=-1)
        elif mode == "average":
            kappa = torch.full((batch, m), 1.0 / m, dtype=torch.float64)
        elif mode == "sum":
            kappa = torch.ones(batch, m, dtype=torch.float64)
        elif mode == "and":
            # Model i's Δᵢ is, up to terms common to all models, (⟨y(κ), μᵢ⟩ − ‖μᵢ‖²/2)/V with
            # y(κ) = y0 + gain Σⱼ κⱼ (x̂₀ʲ − base) the step's end point and μᵢ its kernel mean. Onto σ = 0
            # (final) that limit is −‖x̂₀ᵐⁱˣ(κ) − x̂₀ⁱ‖²/2: y = x̂₀ᵐⁱˣ, μᵢ = x̂₀ⁱ, both shifted by −base
            # (which changes only common terms, and keeps float64 from cancelling ‖x̂₀‖² away).
            if final:
                y0, mu, gain, v = torch.zeros_like(base), x0 - base[None], scale, 1.0
            else:
                y0, mu, gain, v = c_x * xf + c_0 * base + wf, c_x * xf[None] + c_0 * x0, c_0 * scale, var_est
            kappa = torch.empty(batch, m, dtype=torch.float64)
            for b in range(batch):
                lhs = torch.zeros(m + 1, m + 1, dtype=torch.float64)
                rhs = torch.zeros(m + 1, dtype=torch.float64)
                for r in range(m):
                    for j in range(m):
                        lhs[r, j] = gain * torch.dot(x0[j, b] - base[b], mu[r, b]) / v
                    lhs[r, m] = -1.0
                    rhs[r] = -(torch.dot(y0[b], mu[r, b]) - 0.5 * torch.dot(mu[r, b], mu[r, b])) / v
                lhs[m, :m] = 1.0
                rhs[m] = 1.0
                kappa[b] = torch.linalg.solve(lhs, rhs)[:m]
        total = kappa.sum(-1)[:, None]
        if w is not None:
            x0_mix = base + w * ((kappa.T[:, :, None] * x0).sum(0) - total * base)
        else:
            x0_mix = (kappa.T[:, :, None] * x0).sum(0)
            if mode == "sum":  # κ that sum to 1 (the other modes) need no zero-score term; flow starts at α = 0
                x0_mix = x0_mix + (1 - total) * xf / alpha_s
        if final:
            x = x0_mix.to(x.dtype).reshape(x.shape)
        else:
            y = c_x * xf + c_0 * x0_mix + wf
            delta = torch.stack(
                [gaussian_log_pdf(y, c_x * xf + c_0 * x0[k], var_est) - gaussian_log_pdf(xf, a * y, s2) for k in range(m)], -1
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


def sd_reference(pipe, prompts, mode, w, batch, seed, negative="", vp=False, latent_size=None, **kw):
    """Reference for SuperDiffPipeline: ε or v prediction; σ-form (Euler) or VP (DDIM/DDPM) grids;
    ``latent_size`` (h, w), default the UNet's sample size."""
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
        shape = (batch, pipe.unet.config.in_channels, *(latent_size or (pipe.unet.config.sample_size,) * 2))
        x = float(sched.init_noise_sigma) * torch.randn(shape, generator=g).to(pipe.unet.dtype)
        return reference_loop(PerConditionDenoiser(x0, len(prompts)), grid, x, g, mode, w, **kw)


@pytest.mark.parametrize("mode", ["and", "or", "average", "sum"])
def test_sd_traces_match_independent_loop(sd_pipe64, mode):
    out, states = run_with_states(sd_pipe64, PROMPTS, mode=mode, num_inference_steps=STEPS, guidance_scale=5.0,
                                  num_images_per_prompt=2, generator=seeded(3), output_type="latent", progress=False)
    ref = sd_reference(sd_pipe64, PROMPTS, mode, 5.0, 2, 3, states=states)
    assert_traces_match(out, *ref, out.images, rtol=1e-8)


@pytest.mark.parametrize("mode", ["and", "or", "sum"])
def test_sd_unguided_traces_match_independent_loop_without_unconditional_rows(sd_pipe64, mode):
    """guidance_scale=None: the prompt-conditional models alone (Σκ x̂₀, plus (1 − Σκ) x/α for 'sum'),
    and the network sees only the M·B prompt rows."""
    sizes = []
    handle = sd_pipe64.unet.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    try:
        out, states = run_with_states(sd_pipe64, PROMPTS, mode=mode, num_inference_steps=STEPS, guidance_scale=None,
                                      num_images_per_prompt=2, generator=seeded(3), output_type="latent", progress=False)
    finally:
        handle.remove()
    assert sizes == [2 * 2] * STEPS
    assert sd_pipe64.guidance_scale is None
    ref = sd_reference(sd_pipe64, PROMPTS, mode, None, 2, 3, states=states)
    assert_traces_match(out, *ref, out.images, rtol=1e-8)


def test_sd_sizes_are_multiples_of_the_vae_factor_as_in_diffusers(sd_pipe64):
    """18×14 images are 9×7 latents, which the two-level UNet's ×2 downsampling does not divide; the
    UNet takes them (upsample sizes), as diffusers' pipelines let it. Traces match the independent loop."""
    assert sd_pipe64.vae_scale_factor == 2 and len(sd_pipe64.unet.config.block_out_channels) == 2
    out, states = run_with_states(sd_pipe64, PROMPTS, mode="and", num_inference_steps=STEPS, guidance_scale=5.0, height=18, width=14,
                                  generator=seeded(3), output_type="latent", progress=False)
    assert out.images.shape == (1, 4, 9, 7)
    ref = sd_reference(sd_pipe64, PROMPTS, "and", 5.0, 1, 3, states=states, latent_size=(9, 7))
    assert_traces_match(out, *ref, out.images, rtol=1e-8)
    images = sd_pipe64(PROMPTS, num_inference_steps=2, height=18, width=14, output_type="np", progress=False).images
    assert images.shape == (1, 18, 14, 3) and np.isfinite(images).all()


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


def test_sd_channels_last_unet_gives_the_same_traces(sd_pipe64):
    """A memory-format change of the UNet (a common speed setting) must not change results."""
    from superdiff.pipelines import to_channels_last

    kw = dict(mode="and", num_inference_steps=3, num_images_per_prompt=2, progress=False, output_type="latent")
    a = sd_pipe64(PROMPTS, generator=seeded(3), **kw)
    assert not sd_pipe64.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert to_channels_last(sd_pipe64) is sd_pipe64
    try:
        assert sd_pipe64.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        b = sd_pipe64(PROMPTS, generator=seeded(3), **kw)
    finally:
        sd_pipe64.unet.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(b.images, a.images, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b.kappa_trace, a.kappa_trace, rtol=1e-7, atol=1e-7)


def test_compiled_networks_give_the_same_samples(sd_pipe64):
    """compile_networks swaps in torch.compile'd networks; the samples must not change. The "eager"
    backend runs dynamo's graph capture without code generation (inductor takes minutes here)."""
    from superdiff.pipelines import SuperDiffUnconditionalPipeline, compile_networks
    from superdiff.testing import tiny_unconditional_components

    kw = dict(mode="and", num_inference_steps=2, num_images_per_prompt=2, progress=False, output_type="latent")
    unet = sd_pipe64.unet
    a = sd_pipe64(PROMPTS, generator=seeded(5), **kw)
    try:
        assert compile_networks(sd_pipe64, backend="eager") is sd_pipe64
        compiled = sd_pipe64.unet
        assert compiled is not unet and compiled._orig_mod is unet
        assert compile_networks(sd_pipe64, backend="eager").unet is compiled  # idempotent
        b = sd_pipe64(PROMPTS, generator=seeded(5), **kw)
    finally:
        sd_pipe64.unet = unet
    torch.testing.assert_close(b.images, a.images, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.kappa_trace, a.kappa_trace, rtol=1e-10, atol=1e-10)

    stack = SuperDiffUnconditionalPipeline(**tiny_unconditional_components(num_models=2))
    ukw = dict(batch_size=2, mode="or", num_inference_steps=2, output_type="pt", progress=False)
    c = stack(generator=seeded(0), **ukw)
    compile_networks(stack, backend="eager")
    assert all(hasattr(u, "_orig_mod") for u in stack.unets)
    torch.testing.assert_close(stack(generator=seeded(0), **ukw).images, c.images)
    with pytest.raises(ValueError, match="no unet, transformer or unets"):
        compile_networks(object())


def test_sd_callback_latents_replace_the_state_as_in_diffusers(sd_pipe):
    """A callback's returned "latents" are the next step's state: the next network call sees them
    (scaled by c_in = 1/sqrt(σ² + 1), σ read from the scheduler); only the tensors asked for are passed."""
    inputs = []
    handle = sd_pipe.unet.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].clone()))
    seen = []

    def set_state_after_step_1(pipe, i, t, kw):
        seen.append((i, sorted(kw), pipe.num_timesteps, pipe.guidance_scale))
        if i == 1:
            kw["latents"] = torch.full_like(kw["latents"], 0.25)
        return kw

    kw = dict(mode="and", num_inference_steps=STEPS, guidance_scale=5.0, num_images_per_prompt=2, output_type="latent", progress=False)
    try:
        out = sd_pipe(PROMPTS, generator=seeded(2), callback_on_step_end=set_state_after_step_1, **kw)
    finally:
        handle.remove()
    assert seen == [(i, ["latents"], STEPS, 5.0) for i in range(STEPS)]
    sched = sd_pipe.scheduler
    sched.set_timesteps(STEPS)
    sigma = float(sched.sigmas[2])
    torch.testing.assert_close(inputs[2], torch.full_like(inputs[2], 0.25 / math.sqrt(sigma**2 + 1)), rtol=1e-6, atol=1e-7)
    # returning callback_kwargs unchanged (or None) changes nothing; the edit did change the result
    plain = sd_pipe(PROMPTS, generator=seeded(2), **kw)
    same = sd_pipe(PROMPTS, generator=seeded(2), callback_on_step_end=lambda p, i, t, k: k,
                   callback_on_step_end_tensor_inputs=["latents", "denoised", "kappa", "log_densities"], **kw)
    assert torch.equal(plain.images, same.images) and not torch.equal(plain.images, out.images)
    with pytest.raises(ValueError, match="^callback_on_step_end returned a Tensor; return the callback_kwargs dict"):
        sd_pipe(PROMPTS, callback_on_step_end=lambda p, i, t, k: k["latents"], **kw)
    from diffusers.callbacks import SDCFGCutoffCallback  # asks for prompt_embeds, which superdiff has not

    with pytest.raises(ValueError, match=r"^callback_on_step_end_tensor_inputs=\['prompt_embeds'\] is not valid"):
        sd_pipe(PROMPTS, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5), **kw)


@pytest.mark.parametrize("kind", ["sd", "unconditional"])
def test_progress_bar_follows_set_progress_bar_config(sd_pipe, kind, capsys):
    """The bar is the pipeline's (diffusers' progress_bar): desc, file and disable apply; progress=False hides it."""
    import io

    from superdiff.pipelines import SuperDiffUnconditionalPipeline
    from superdiff.testing import tiny_unconditional_components

    if kind == "sd":
        pipe, kw = sd_pipe, dict(prompts=PROMPTS, num_inference_steps=3, output_type="latent")
    else:
        pipe, kw = SuperDiffUnconditionalPipeline(**tiny_unconditional_components()), dict(num_inference_steps=3, output_type="latent")
    shown, hidden, unused = io.StringIO(), io.StringIO(), io.StringIO()
    try:
        pipe.set_progress_bar_config(desc="composing", file=shown)
        pipe(**kw)
        pipe.set_progress_bar_config(desc="composing", file=hidden, disable=True)
        pipe(**kw)
        pipe.set_progress_bar_config(desc="composing", file=unused)
        pipe(progress=False, **kw)
    finally:
        pipe.set_progress_bar_config()
    assert "composing" in shown.getvalue() and "3/3" in shown.getvalue()
    assert hidden.getvalue() == "" and unused.getvalue() == ""
    assert "3/3" not in capsys.readouterr().err


def test_sd_one_batched_network_call_per_step(sd_pipe):
    sizes = []
    handle = sd_pipe.unet.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    try:
        sd_pipe(PROMPTS + ["a cat"], mode="or", num_inference_steps=5, num_images_per_prompt=2, output_type="latent", progress=False)
    finally:
        handle.remove()
    assert sizes == [(3 + 1) * 2] * 5


BAD_SD_INPUTS = [
    (dict(prompts=["a red circle"]), "prompts"),
    (dict(prompts="a red circle"), "prompts"),
    (dict(prompts=["a red circle", ""]), "prompts[1]"),
    (dict(mode="xor"), "mode"),
    (dict(height=17), "height"),
    (dict(width=11), "width"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(log_weights=[0.0, 1.0, 2.0]), "log_weights"),
    (dict(mode="average", log_weights=[0.0, 1.0]), "log_weights"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-2.0, mode="or"), "temperature"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(negative_prompt=["a cat", "a dog"]), "negative_prompt"),
    (dict(negative_prompt=[3]), "negative_prompt"),
    (dict(guidance_scale=None, negative_prompt="a cat"), "negative_prompt"),
    (dict(callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]), "callback_on_step_end_tensor_inputs"),
    (dict(callback_on_step_end_tensor_inputs="latents"), "callback_on_step_end_tensor_inputs"),
    (dict(generator=[torch.Generator(), torch.Generator()], num_images_per_prompt=3), "generator"),
]


def test_sd_takes_diffusers_prompt_argument(sd_pipe):
    kw = dict(mode="or", num_inference_steps=2, progress=False, output_type="latent")
    ours = sd_pipe(PROMPTS, generator=seeded(2), **kw)
    theirs = sd_pipe(prompt=PROMPTS, generator=seeded(2), **kw)
    torch.testing.assert_close(theirs.images, ours.images, rtol=0, atol=0)
    with pytest.raises(ValueError, match="once"):
        sd_pipe(PROMPTS, prompt=PROMPTS, **kw)
    with pytest.raises(ValueError, match="at least 2"):
        sd_pipe(prompt="a red circle", **kw)


def test_sd_one_generator_per_image_as_in_diffusers(sd_pipe64):
    kw = dict(mode="and", num_inference_steps=3, progress=False, output_type="latent")
    both = sd_pipe64(PROMPTS, generator=[seeded(5), seeded(6)], num_images_per_prompt=2, **kw)
    second = sd_pipe64(PROMPTS, generator=[seeded(6)], num_images_per_prompt=1, **kw)
    torch.testing.assert_close(both.images[1:], second.images, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(both.kappa_trace[:, 1:], second.kappa_trace, rtol=1e-8, atol=1e-8)


def test_sd_interrupt_stops_after_the_step_as_in_diffusers(sd_pipe):
    seen = []

    def stop_after_two(pipe, step, timestep, kwargs):
        seen.append(kwargs["latents"].clone())
        pipe._interrupt = step == 1
        return kwargs

    out = sd_pipe(PROMPTS, mode="or", num_inference_steps=5, generator=seeded(0), progress=False, output_type="latent",
                  callback_on_step_end=stop_after_two)
    assert len(seen) == 2 and out.kappa_trace.shape[0] == 2 and out.timesteps.shape == (2,)
    torch.testing.assert_close(out.images, seen[-1])
    again = sd_pipe(PROMPTS, mode="or", num_inference_steps=5, generator=seeded(0), progress=False, output_type="latent")
    assert again.kappa_trace.shape[0] == 5  # the flag is reset by the next call


@pytest.mark.parametrize("kwargs, argument", BAD_SD_INPUTS)
def test_sd_bad_inputs_raise_before_any_network_call(sd_pipe, kwargs, argument):
    unet_calls, text_calls = count_calls(sd_pipe.unet), count_calls(sd_pipe.text_encoder)
    call = dict(prompts=PROMPTS, num_inference_steps=2, progress=False) | kwargs
    with pytest.raises(ValueError, match=f"^{argument.replace('[', '.').replace(']', '.')}="):
        sd_pipe(**call)
    assert unet_calls == [] and text_calls == []
    for hooks in (sd_pipe.unet._forward_pre_hooks, sd_pipe.text_encoder._forward_pre_hooks):
        hooks.clear()


def test_sd_save_load_round_trip_and_from_pipe(sd_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    kw = dict(mode="or", num_inference_steps=3, generator=None, output_type="np", progress=False)
    before = sd_pipe(PROMPTS, **(kw | {"generator": seeded(5)}))
    sd_pipe.save_pretrained(tmp_path / "pipe")
    loaded = SuperDiffPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    after = loaded(PROMPTS, **(kw | {"generator": seeded(5)}))
    np.testing.assert_array_equal(before.images, after.images)
    assert torch.equal(before.log_density_trace, after.log_density_trace)
    # a diffusers StableDiffusionPipeline folder loads too, and from_pipe shares its modules
    sd = StableDiffusionPipeline(**{k: getattr(sd_pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.save_pretrained(tmp_path / "sd")
    from_sd = SuperDiffPipeline.from_pretrained(tmp_path / "sd", local_files_only=True, torch_dtype=torch.float32)
    np.testing.assert_array_equal(before.images, from_sd(PROMPTS, **(kw | {"generator": seeded(5)})).images)
    shared = SuperDiffPipeline.from_pipe(sd)
    assert shared.unet is sd.unet and shared.text_encoder is sd.text_encoder and shared.vae is sd.vae
    np.testing.assert_array_equal(before.images, shared(PROMPTS, **(kw | {"generator": seeded(5)})).images)


def test_sd_text_encoding_matches_diffusers(sd_pipe):
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline(**{k: getattr(sd_pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ours = sd_pipe.encode_prompts(PROMPTS, "a cat")
    cond, neg = sd.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=["a cat"] * 2)
    torch.testing.assert_close(ours[:2], cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[2], neg[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Pixel space (vae=None): the embedded shapes model's layout
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pixel_pipe(tmp_path_factory):
    return SuperDiffPipeline(**tiny_sd_components(vae=False, tokenizer_dir=tmp_path_factory.mktemp("tok")))


def test_pixel_space_shapes_traces_and_round_trip(pixel_pipe, tmp_path):
    assert pixel_pipe.vae is None and pixel_pipe.vae_scale_factor == 1
    out = pixel_pipe(PROMPTS, mode="and", num_inference_steps=3, num_images_per_prompt=2, generator=seeded(0), output_type="np", progress=False)
    assert out.images.shape == (2, 8, 8, 3) and np.isfinite(out.images).all()
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0
    # no VAE: any size (9×7 is not divided by the UNet's ×2 downsampling; it takes it through upsample sizes)
    assert pixel_pipe(PROMPTS, num_inference_steps=2, height=9, width=7, output_type="np", progress=False).images.shape == (1, 9, 7, 3)
    with pytest.raises(ValueError, match="^height=0 is not valid: must be a positive multiple of 1"):
        pixel_pipe(PROMPTS, height=0, progress=False)
    pipe64 = SuperDiffPipeline(**pixel_pipe.components).to(torch.float64)
    out, states = run_with_states(pipe64, PROMPTS, mode="and", num_inference_steps=STEPS, guidance_scale=4.0, generator=seeded(2),
                                  output_type="latent", progress=False)
    assert_traces_match(out, *sd_reference(pipe64, PROMPTS, "and", 4.0, 1, 2, states=states), out.images, rtol=1e-8)
    pixel_pipe.to(torch.float32)
    kw = dict(mode="or", num_inference_steps=3, output_type="pt", progress=False)
    before = pixel_pipe(PROMPTS, generator=seeded(4), **kw)
    pixel_pipe.save_pretrained(tmp_path / "with_index")
    loaded = SuperDiffPipeline.from_pretrained(tmp_path / "with_index", local_files_only=True)
    assert loaded.vae is None
    assert torch.equal(before.images, loaded(PROMPTS, generator=seeded(4), **kw).images)
    # component subfolders without model_index.json
    for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
        getattr(pixel_pipe, name).save_pretrained(tmp_path / "bare" / name)
    bare = SuperDiffPipeline.from_pretrained(tmp_path / "bare")
    assert torch.equal(before.images, bare(PROMPTS, generator=seeded(4), **kw).images)


# ------------------------------------------------------------------------------------------------
# Loading: loading options in folders without model_index.json; the pipeline class a model needs
# ------------------------------------------------------------------------------------------------


def test_component_folder_honours_use_safetensors(tmp_path):
    """A folder without model_index.json passes use_safetensors (and the other loading options) to
    every component: pickle weights are refused with use_safetensors=True, as diffusers refuses them."""
    comps = tiny_sd_components(vae=False, tokenizer_dir=tmp_path / "tok")
    bare = tmp_path / "bare"
    comps["unet"].save_pretrained(bare / "unet", safe_serialization=False)
    for name in ("text_encoder", "tokenizer", "scheduler"):
        comps[name].save_pretrained(bare / name)
    assert sorted(p.name for p in (bare / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
    with pytest.raises(OSError, match="safetensors"):
        SuperDiffPipeline.from_pretrained(bare, use_safetensors=True, local_files_only=True)
    # None (diffusers' default): safetensors where there are some, else pickle. (False asks for pickle
    # only, which transformers 5 never writes: it fails on text_encoder/ here, as diffusers' own loader does.)
    loaded = SuperDiffPipeline.from_pretrained(bare, use_safetensors=None, local_files_only=True, torch_dtype=torch.float64)
    assert loaded.unet.dtype == torch.float64 and loaded.text_encoder.dtype == torch.float64
    for name, value in comps["unet"].state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[name], value.double(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="low_cpu_mem_usage.*not supported.*without model_index.json"):
        SuperDiffPipeline.from_pretrained(bare, low_cpu_mem_usage=False)
    # the unconditional stack's loader (its own index, one folder per UNet) passes the options on too
    from superdiff.pipelines import SuperDiffUnconditionalPipeline
    from superdiff.testing import tiny_unconditional_components

    SuperDiffUnconditionalPipeline(**tiny_unconditional_components()).save_pretrained(tmp_path / "stack", safe_serialization=False)
    with pytest.raises(OSError, match="safetensors"):
        SuperDiffUnconditionalPipeline.from_pretrained(tmp_path / "stack", use_safetensors=True, local_files_only=True)
    assert len(SuperDiffUnconditionalPipeline.from_pretrained(tmp_path / "stack", use_safetensors=False).unets) == 2


def test_pipeline_class_for_and_from_pretrained_of_another_pipelines_folder(tmp_path):
    """model_index.json's _class_name picks the superdiff pipeline; loading a folder into the wrong one
    fails at once with a ValueError naming the class to use (it used to fail at the first call)."""
    from diffusers import DDPMPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    from superdiff.pipelines import (SuperDiffFlowPipeline, SuperDiffUnconditionalPipeline, SuperDiffXLPipeline,
                                     pipeline_class_for)
    from superdiff.testing import tiny_sd3_components, tiny_sdxl_components, tiny_unconditional_components

    sd = tiny_sd_components(tokenizer_dir=tmp_path / "tok")
    StableDiffusionPipeline(**sd, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp_path / "sd")
    StableDiffusionXLPipeline(**tiny_sdxl_components(tokenizer_dir=tmp_path / "tok")).save_pretrained(tmp_path / "xl")
    StableDiffusion3Pipeline(**tiny_sd3_components(tokenizer_dir=tmp_path / "tok")).save_pretrained(tmp_path / "sd3")
    folders = {"sd": ("StableDiffusionPipeline", SuperDiffPipeline), "xl": ("StableDiffusionXLPipeline", SuperDiffXLPipeline),
               "sd3": ("StableDiffusion3Pipeline", SuperDiffFlowPipeline)}
    for folder, (class_name, right) in folders.items():
        assert pipeline_class_for(tmp_path / folder) is right
        assert type(right.from_pretrained(tmp_path / folder, local_files_only=True)) is right
        for wrong in {SuperDiffPipeline, SuperDiffXLPipeline, SuperDiffFlowPipeline} - {right}:
            with pytest.raises(ValueError, match=f"is a {class_name} .*{wrong.__name__} cannot load.*{right.__name__}.from_pretrained"):
                wrong.from_pretrained(tmp_path / folder, local_files_only=True)
    # folders without model_index.json, and classes superdiff has no pipeline for
    for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
        sd[name].save_pretrained(tmp_path / "bare" / name)
    assert pipeline_class_for(tmp_path / "bare") is SuperDiffPipeline
    uncond = tiny_unconditional_components()
    SuperDiffUnconditionalPipeline(**uncond).save_pretrained(tmp_path / "stack")
    assert pipeline_class_for(tmp_path / "stack") is SuperDiffUnconditionalPipeline
    with pytest.raises(ValueError, match=r"lacks the subfolders \['unet', 'text_encoder', 'tokenizer', 'scheduler'\]"):
        pipeline_class_for(tmp_path / "tok")
    DDPMPipeline(unet=uncond["unets"][0], scheduler=uncond["scheduler"]).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(ValueError, match=r"is a DDPMPipeline .*SuperDiffUnconditionalPipeline.from_pretrained\(\[folder_a"):
        pipeline_class_for(tmp_path / "ddpm")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match="is a KandinskyPipeline .*no pipeline for"):
        pipeline_class_for(tmp_path / "other")


# ------------------------------------------------------------------------------------------------
# Separately trained unconditional UNet2DModels (DDPM schedule, VP process)
# ------------------------------------------------------------------------------------------------


def vp_grid(sched, steps):
    """(α, σ) = (sqrt(ᾱ_k), sqrt(1 − ᾱ_k)) at the scheduler's timesteps, then the clean end (1, 0)."""
    sched.set_timesteps(steps)
    abar = sched.alphas_cumprod.double()
    timesteps = [int(t) for t in sched.timesteps]
    return timesteps, [(math.sqrt(abar[t]), math.sqrt(1 - abar[t])) for t in timesteps] + [(1.0, 0.0)]


@pytest.mark.parametrize("mode", ["or", "and", "sum"])
def test_unconditional_traces_match_independent_loop(mode):
    from superdiff.pipelines import SuperDiffUnconditionalPipeline
    from superdiff.testing import tiny_unconditional_components

    comps = tiny_unconditional_components(num_models=2)
    pipe = SuperDiffUnconditionalPipeline(**comps).to(torch.float64)
    out, states = run_with_states(pipe, batch_size=2, mode=mode, num_inference_steps=STEPS, generator=seeded(1), output_type="latent",
                                  progress=False)
    timesteps, grid = vp_grid(pipe.scheduler, STEPS)

    def x0(x, i, k):  # ε-prediction: x̂₀ = (x − σ ε)/α
        alpha, sigma = grid[i]
        return (x - sigma * pipe.unets[k](x, timesteps[i]).sample) / alpha

    g = seeded(1)
    start = torch.randn(2, 3, 8, 8, generator=g).double()  # init_noise_sigma = 1
    with torch.no_grad():
        ref = reference_loop(PerConditionDenoiser(x0, 2), grid, start, g, mode, None, states=states)
    assert_traces_match(out, *ref, out.images, rtol=1e-8)
    if mode == "and":
        assert float((out.log_density_trace[..., 0] - out.log_density_trace[..., 1]).abs().max()) < 1e-8


def test_unconditional_shapes_determinism_round_trip_and_from_pipe(tmp_path):
    from diffusers import DDPMPipeline

    from superdiff.pipelines import SuperDiffUnconditionalPipeline
    from superdiff.testing import tiny_unconditional_components

    pipe = SuperDiffUnconditionalPipeline(**tiny_unconditional_components(num_models=3))
    kw = dict(batch_size=2, mode="or", num_inference_steps=3, output_type="np", progress=False)
    a, b = pipe(generator=seeded(0), **kw), pipe(generator=seeded(0), **kw)
    assert a.images.shape == (2, 8, 8, 3) and a.kappa_trace.shape == (3, 2, 3) and a.log_density_trace.shape == (4, 2, 3)
    np.testing.assert_array_equal(a.images, b.images)
    torch.testing.assert_close(a.kappa_trace.double(), torch.softmax(a.log_density_trace[:-1], -1), rtol=1e-5, atol=1e-6)
    pipe.save_pretrained(tmp_path / "stack")
    loaded = SuperDiffUnconditionalPipeline.from_pretrained(tmp_path / "stack", local_files_only=True)
    np.testing.assert_array_equal(a.images, loaded(generator=seeded(0), **kw).images)
    ddpms = [DDPMPipeline(unet=u, scheduler=pipe.scheduler) for u in pipe.unets]
    for i, d in enumerate(ddpms):
        d.save_pretrained(tmp_path / f"ddpm{i}")
    from_folders = SuperDiffUnconditionalPipeline.from_pretrained([tmp_path / f"ddpm{i}" for i in range(3)], local_files_only=True)
    np.testing.assert_array_equal(a.images, from_folders(generator=seeded(0), **kw).images)
    shared = SuperDiffUnconditionalPipeline.from_pipe(ddpms)
    assert all(s is d.unet for s, d in zip(shared.unets, ddpms))


def test_unconditional_bad_inputs_and_incompatible_models():
    from diffusers import DDPMScheduler

    from superdiff.pipelines import SuperDiffUnconditionalPipeline
    from superdiff.testing import tiny_unconditional_components, tiny_unet2d

    comps = tiny_unconditional_components(num_models=2)
    pipe = SuperDiffUnconditionalPipeline(**comps)
    calls = [count_calls(u) for u in pipe.unets]
    for kwargs, argument in [
        (dict(mode="nand"), "mode"),
        (dict(log_weights=[1.0]), "log_weights"),
        (dict(num_inference_steps=-3), "num_inference_steps"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(batch_size=0), "batch_size"),
        (dict(generator=123), "generator"),
    ]:
        with pytest.raises(ValueError, match=f"^{argument}="):
            pipe(progress=False, **kwargs)
    one = SuperDiffUnconditionalPipeline(comps["unets"][:1], comps["scheduler"])
    with pytest.raises(ValueError, match="^unets=.*at least 2"):
        one(mode="and", progress=False)
    assert all(c == [] for c in calls)
    with pytest.raises(ValueError, match=r"unets\[1\] samples .* \(3, 16\) but unets\[0\] samples \(3, 8\)"):
        SuperDiffUnconditionalPipeline([tiny_unet2d(), tiny_unet2d(sample_size=16)], comps["scheduler"])
    for unets, i in [([tiny_unet2d(out_channels=5), tiny_unet2d()], 0), ([tiny_unet2d(), tiny_unet2d(out_channels=5)], 1)]:
        with pytest.raises(ValueError, match=rf"^unets\[{i}\] has out_channels=5 for in_channels=3"):
            SuperDiffUnconditionalPipeline(unets, comps["scheduler"])
    with pytest.raises(ValueError, match="different noise process"):
        SuperDiffUnconditionalPipeline.check_schedulers([DDPMScheduler(), DDPMScheduler(beta_schedule="squaredcos_cap_v2")])


# ------------------------------------------------------------------------------------------------
# v-prediction, with VP (DDIM, DDPM) and σ-form (Euler) grids
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "euler"])
def test_sd_v_prediction_traces_match_independent_loop(scheduler, tmp_path):
    pipe = SuperDiffPipeline(**tiny_sd_components("v_prediction", scheduler, tokenizer_dir=tmp_path)).to(torch.float64)
    out, states = run_with_states(pipe, PROMPTS, mode="and", num_inference_steps=STEPS, guidance_scale=6.0, num_images_per_prompt=2,
                                  generator=seeded(9), output_type="latent", progress=False)
    ref = sd_reference(pipe, PROMPTS, "and", 6.0, 2, 9, vp=scheduler != "euler", states=states)
    assert_traces_match(out, *ref, out.images, rtol=1e-8)
    if scheduler == "ddpm":  # the "leading" grid ends at timestep 0; the last step lands on the clean image
        assert int(out.timesteps[-1]) == 0


# ------------------------------------------------------------------------------------------------
# SDXL (two encoders, pooled embeddings, time ids)
# ------------------------------------------------------------------------------------------------


def sdxl_pipes(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from superdiff.pipelines import SuperDiffXLPipeline
    from superdiff.testing import tiny_sdxl_components

    ours = SuperDiffXLPipeline(**tiny_sdxl_components(tokenizer_dir=tmp_path)).to(torch.float64)
    return ours, StableDiffusionXLPipeline(**{k: v for k, v in ours.components.items() if k != "force_zeros_for_empty_prompt"})


@pytest.mark.parametrize("mode, w", [("and", 5.0), ("or", 5.0), ("or", None)])
def test_sdxl_traces_match_independent_loop(mode, w, tmp_path):
    ours, diffusers_xl = sdxl_pipes(tmp_path)
    out, states = run_with_states(ours, PROMPTS, mode=mode, num_inference_steps=STEPS, guidance_scale=w, num_images_per_prompt=2,
                                  generator=seeded(4), output_type="latent", progress=False)
    assert out.images.shape == (2, 4, 8, 8)
    sched = ours.scheduler
    sched.set_timesteps(STEPS)
    abar = sched.alphas_cumprod.double()
    timesteps = [int(t) for t in sched.timesteps]
    grid = [(1.0, math.sqrt((1 - abar[t]) / abar[t])) for t in timesteps] + [(1.0, 0.0)]
    with torch.no_grad():  # diffusers' own SDXL text encoding, one prompt at a time; zeros for the unconditional
        conds = [diffusers_xl.encode_prompt(p, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True) for p in PROMPTS]
        embeds = [c[0] for c in conds] + [conds[0][1]]
        pooled = [c[2] for c in conds] + [conds[0][3]]
        assert float(embeds[-1].abs().max()) == 0.0
        time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]], dtype=torch.float64)

        def x0(x, i, k):
            sigma = grid[i][1]
            b = x.shape[0]
            eps = ours.unet(x / math.sqrt(sigma**2 + 1), torch.tensor(float(timesteps[i])), encoder_hidden_states=embeds[k].expand(b, -1, -1),
                            added_cond_kwargs={"text_embeds": pooled[k].expand(b, -1), "time_ids": time_ids.expand(b, -1)}).sample
            return x - sigma * eps

        g = seeded(4)
        start = float(sched.init_noise_sigma) * torch.randn(2, 4, 8, 8, generator=g).double()
        ref = reference_loop(PerConditionDenoiser(x0, 2), grid, start, g, mode, w, states=states)
    assert_traces_match(out, *ref, out.images, rtol=1e-8)


def test_sdxl_images_determinism_round_trip_and_from_pipe(tmp_path):
    from superdiff.pipelines import SuperDiffXLPipeline

    ours, diffusers_xl = sdxl_pipes(tmp_path / "tok")
    ours.to(torch.float32)
    kw = dict(mode="and", num_inference_steps=3, output_type="np", progress=False)
    a = ours(PROMPTS, generator=seeded(0), **kw)
    assert a.images.shape == (1, 16, 16, 3) and np.isfinite(a.images).all()
    np.testing.assert_array_equal(a.images, ours(PROMPTS, generator=seeded(0), **kw).images)
    neg = ours(PROMPTS, generator=seeded(0), negative_prompt="a cat", **kw)
    assert not np.array_equal(a.images, neg.images)
    np.testing.assert_array_equal(neg.images, ours(PROMPTS, generator=seeded(0), negative_prompt=["a cat"], **kw).images)
    ours.save_pretrained(tmp_path / "xl")
    loaded = SuperDiffXLPipeline.from_pretrained(tmp_path / "xl", local_files_only=True)
    np.testing.assert_array_equal(a.images, loaded(PROMPTS, generator=seeded(0), **kw).images)
    shared = SuperDiffXLPipeline.from_pipe(diffusers_xl)
    assert shared.unet is diffusers_xl.unet and shared.text_encoder_2 is diffusers_xl.text_encoder_2
    np.testing.assert_array_equal(a.images, shared(PROMPTS, generator=seeded(0), **kw).images)
    calls = count_calls(ours.unet)
    with pytest.raises(ValueError, match="^height="):
        ours(PROMPTS, height=17, progress=False)
    assert calls == []


# ------------------------------------------------------------------------------------------------
# SD3-style flow matching (velocity prediction, starts at σ = 1 where α = 0)
# ------------------------------------------------------------------------------------------------


def sd3_pipes(tmp_path, vae=True, t5=False):
    from diffusers import StableDiffusion3Pipeline

    from superdiff.pipelines import SuperDiffFlowPipeline
    from superdiff.testing import tiny_sd3_components

    comps = tiny_sd3_components(vae=vae, tokenizer_dir=tmp_path, t5=t5)
    ours = SuperDiffFlowPipeline(**comps)
    return ours, StableDiffusion3Pipeline(**comps)


@pytest.mark.parametrize("mode, t5, w", [("and", False, 4.0), ("or", False, 4.0), ("and", True, 4.0), ("and", False, None)])
def test_flow_traces_match_independent_loop(mode, t5, w, tmp_path):
    ours, sd3 = sd3_pipes(tmp_path, t5=t5)
    assert (ours.text_encoder_3 is not None) == t5
    ours.to(torch.float64)
    out, states = run_with_states(ours, PROMPTS, mode=mode, num_inference_steps=STEPS, guidance_scale=w, num_images_per_prompt=2,
                                  generator=seeded(6), output_type="latent", progress=False, max_sequence_length=8)
    sched = ours.scheduler
    sched.set_timesteps(STEPS)
    sigmas = [float(s) for s in sched.sigmas.double()]
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    grid = [(1.0 - s, s) for s in sigmas]  # x_t = (1 − t) x₀ + t ε, t = σ
    with torch.no_grad():  # diffusers' own SD3 text encoding, one prompt at a time (negative: "")
        conds = [sd3.encode_prompt(p, None, None, device="cpu", do_classifier_free_guidance=True, max_sequence_length=8) for p in PROMPTS]
        embeds = [c[0].double() for c in conds] + [conds[0][1].double()]
        pooled = [c[2].double() for c in conds] + [conds[0][3].double()]

        def x0(x, i, k):  # velocity u = ε − x₀  ⇒  x̂₀ = x − t u
            b = x.shape[0]
            u = ours.transformer(x, timestep=torch.full((b,), sigmas[i] * 1000.0), encoder_hidden_states=embeds[k].expand(b, -1, -1),
                                 pooled_projections=pooled[k].expand(b, -1)).sample
            return x - sigmas[i] * u

        g = seeded(6)
        start = torch.randn(2, 4, 8, 8, generator=g).double()
        ref = reference_loop(PerConditionDenoiser(x0, 2), grid, start, g, mode, w, states=states)
    assert_traces_match(out, *ref, out.images, rtol=1e-8)


def test_flow_finite_from_sigma_one_determinism_round_trip_and_from_pipe(tmp_path):
    from superdiff.pipelines import SuperDiffFlowPipeline

    ours, sd3 = sd3_pipes(tmp_path / "tok")
    kw = dict(num_inference_steps=5, num_images_per_prompt=2, output_type="np", progress=False, max_sequence_length=8)
    for mode in ("and", "or", "average", "sum"):
        out = ours(PROMPTS, mode=mode, generator=seeded(0), **kw)
        assert float(out.timesteps[0]) == 1000.0  # σ = 1, α = 0
        assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all()
        assert torch.isfinite(out.log_density_trace).all() and torch.isfinite(out.kappa_trace).all()
    again = ours(PROMPTS, mode="sum", generator=seeded(0), **kw)
    np.testing.assert_array_equal(out.images, again.images)
    negative = ours(PROMPTS, mode="sum", generator=seeded(0), negative_prompt="a cat", **kw).images
    assert not np.array_equal(out.images, negative)
    np.testing.assert_array_equal(negative, ours(PROMPTS, mode="sum", generator=seeded(0), negative_prompt=("a cat",), **kw).images)
    ours.save_pretrained(tmp_path / "flow")
    loaded = SuperDiffFlowPipeline.from_pretrained(tmp_path / "flow", local_files_only=True)
    np.testing.assert_array_equal(out.images, loaded(PROMPTS, mode="sum", generator=seeded(0), **kw).images)
    shared = SuperDiffFlowPipeline.from_pipe(sd3)
    assert shared.transformer is sd3.transformer
    pixel, _ = sd3_pipes(tmp_path / "tok2", vae=False)
    assert pixel(PROMPTS, generator=seeded(0), output_type="latent", **{k: v for k, v in kw.items() if k != "output_type"}).images.shape == (2, 4, 8, 8)
    calls = count_calls(ours.transformer)
    for bad, argument in [(dict(height=15), "height"), (dict(prompts=["a cat"]), "prompts"), (dict(guidance_scale=-0.5), "guidance_scale"),
                          (dict(guidance_scale=None, mode="sum"), "guidance_scale")]:
        with pytest.raises(ValueError, match=f"^{argument}="):
            ours(**(dict(prompts=PROMPTS, progress=False) | bad))
    assert calls == []


def test_half_precision_network_keeps_float32_state(tmp_path):
    """bf16 networks (CPU here; fp16/bf16 on CUDA): inputs cast down, outputs back to a float32 state."""
    pipe = SuperDiffPipeline(**tiny_sd_components(tokenizer_dir=tmp_path)).to(torch.bfloat16)
    seen = []
    out = pipe(PROMPTS, mode="and", num_inference_steps=3, generator=seeded(0), output_type="latent", progress=False,
               callback_on_step_end=lambda p, i, t, kw: seen.append((i, kw["latents"].dtype, kw["kappa"].shape)),
               callback_on_step_end_tensor_inputs=["latents", "kappa"])
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
    assert out.log_density_trace.dtype == torch.float64 and torch.isfinite(out.log_density_trace).all()
    assert seen == [(i, torch.float32, (1, 2)) for i in range(3)]
    assert np.isfinite(pipe(PROMPTS, mode="or", num_inference_steps=2, output_type="np", progress=False).images).all()


# ------------------------------------------------------------------------------------------------
# Per-step host-to-device traffic (the meta device plays the accelerator)
# ------------------------------------------------------------------------------------------------


class HostToDeviceCopies(TorchDispatchMode):
    """Records every copy of a tensor from the host to another device."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._to_copy.default and kwargs.get("device") is not None:
            if args[0].device.type == "cpu" and torch.device(kwargs["device"]).type != "cpu":
                self.copies.append(f"{func} {tuple(args[0].shape)}")
        if func is aten.copy_.default and args[1].device.type == "cpu" and args[0].device.type != "cpu":
            self.copies.append(f"{func} {tuple(args[1].shape)}")
        return func(*args, **kwargs)


def unet_denoiser(kind, device, num_outputs):
    """A tiny conditional UNet on ``device`` as a DiffusersDenoiser or a NetworkDenoiser, its
    conditions (M+1, 5, 32) left on the host, as text encoders running on the CPU leave them."""
    from diffusers import EulerDiscreteScheduler

    from superdiff import NetworkDenoiser
    from superdiff.pipelines.denoisers import DiffusersDenoiser, schedule_from_scheduler
    from superdiff.testing import tiny_unet_condition

    unet = tiny_unet_condition().to(device)
    schedule = schedule_from_scheduler(EulerDiscreteScheduler(), 4)
    embeds = torch.randn(num_outputs, 5, 32)
    if kind == "diffusers":
        denoiser = DiffusersDenoiser(unet, schedule.process, schedule.prediction, schedule.timestep,
                                     conditions={"encoder_hidden_states": embeds}, num_outputs=num_outputs,
                                     scale_input=schedule.scale_input)
    else:
        denoiser = NetworkDenoiser(lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample, schedule.process, "epsilon",
                                   conditions=embeds, time_input=schedule.process.timestep)
    return denoiser, schedule.process.time_grid(4)


@pytest.mark.parametrize("kind", ["diffusers", "network"])
def test_a_step_copies_nothing_from_the_host_to_the_device(kind):
    """Conditions move to the device once; timesteps are filled there from a host float."""
    denoiser, t = unet_denoiser(kind, "meta", 3)
    x = torch.zeros(2, 4, 8, 8, device="meta")
    with HostToDeviceCopies() as first:
        assert denoiser(x, t[0]).shape == (3, 2, 4, 8, 8)
    with HostToDeviceCopies() as later:
        denoiser(x, t[1]), denoiser(x, t[2])
    assert first.copies != []  # the conditions, once: the check sees copies where there are some
    assert later.copies == []


@pytest.mark.parametrize("kind", ["diffusers", "network"])
def test_cached_conditions_made_under_inference_mode_do_not_reach_autograd(kind):
    """A denoiser first run under inference_mode (SDE sampling) can then be differentiated (ODE divergences)."""
    denoiser, times = unet_denoiser(kind, "cpu", 2)
    t = times[1]
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        denoiser(x, t)
    x.requires_grad_(True)
    denoiser(x, t).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
