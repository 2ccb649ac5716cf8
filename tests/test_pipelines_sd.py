"""SuperDiffPipeline (Stable Diffusion 1.x/2.x) on tiny seeded models (CPU, offline): traces against the
independent loop of pipeline_reference.py (ε and v prediction, latent and pixel space), diffusers'
call conventions, bad inputs, saving and loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline_reference import (
    PROMPTS,
    STEPS,
    PerConditionDenoiser,
    assert_traces_match,
    count_calls,
    reference_loop,
    run_with_states,
    seeded,
)
from superdiff.pipelines import SuperDiffPipeline
from superdiff.testing import tiny_sd_components

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
    ids = tokenizer(
        [text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return text_encoder(ids.input_ids)[0]




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
            out = pipe.unet(
                x_vp, torch.tensor(float(timesteps[i])), encoder_hidden_states=embeddings[k].expand(x.shape[0], -1, -1)
            ).sample
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
        out, states = run_with_states(
            sd_pipe64,
            PROMPTS,
            mode=mode,
            num_inference_steps=STEPS,
            guidance_scale=None,
            num_images_per_prompt=2,
            generator=seeded(3),
            output_type="latent",
            progress=False,
        )
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
    out, states = run_with_states(
        sd_pipe64,
        PROMPTS,
        mode="and",
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        height=18,
        width=14,
        generator=seeded(3),
        output_type="latent",
        progress=False,
    )
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
    out = sd_pipe(
        three,
        mode="and",
        num_inference_steps=6,
        generator=seeded(0),
        num_images_per_prompt=2,
        output_type="latent",
        progress=False,
    )
    trace = out.log_density_trace
    spread = (trace - trace.mean(-1, keepdim=True)).abs().max()
    assert float(spread) < 1e-6 * (1 + float(trace.abs().max()))
    assert float(trace[-1].abs().min()) > 1.0  # the densities did move
    out = sd_pipe(
        three,
        mode="or",
        num_inference_steps=6,
        generator=seeded(0),
        num_images_per_prompt=2,
        output_type="latent",
        progress=False,
    )
    torch.testing.assert_close(
        out.kappa_trace.double(), torch.softmax(out.log_density_trace[:-1], -1), rtol=1e-5, atol=1e-6
    )
    assert float((out.kappa_trace - 1 / 3).abs().max()) > 1e-3  # OR did reweight


def test_sd_shapes_outputs_and_determinism(sd_pipe):
    kw = dict(mode="and", num_inference_steps=3, num_images_per_prompt=2, progress=False)
    a = sd_pipe(PROMPTS, generator=seeded(7), output_type="pt", **kw)
    b = sd_pipe(PROMPTS, generator=seeded(7), output_type="pt", **kw)
    c = sd_pipe(PROMPTS, generator=seeded(8), output_type="pt", **kw)
    assert a.images.shape == (2, 3, 16, 16)
    assert (
        a.log_densities.shape == (2, 2) and a.log_density_trace.shape == (4, 2, 2) and a.kappa_trace.shape == (3, 2, 2)
    )
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

    kw = dict(
        mode="and",
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        num_images_per_prompt=2,
        output_type="latent",
        progress=False,
    )
    try:
        out = sd_pipe(PROMPTS, generator=seeded(2), callback_on_step_end=set_state_after_step_1, **kw)
    finally:
        handle.remove()
    assert seen == [(i, ["latents"], STEPS, 5.0) for i in range(STEPS)]
    sched = sd_pipe.scheduler
    sched.set_timesteps(STEPS)
    sigma = float(sched.sigmas[2])
    torch.testing.assert_close(
        inputs[2], torch.full_like(inputs[2], 0.25 / math.sqrt(sigma**2 + 1)), rtol=1e-6, atol=1e-7
    )
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
        pipe, kw = (
            SuperDiffUnconditionalPipeline(**tiny_unconditional_components()),
            dict(num_inference_steps=3, output_type="latent"),
        )
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
        sd_pipe(
            PROMPTS + ["a cat"],
            mode="or",
            num_inference_steps=5,
            num_images_per_prompt=2,
            output_type="latent",
            progress=False,
        )
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
    again = sd_pipe(
        PROMPTS, mode="or", num_inference_steps=5, generator=seeded(0), progress=False, output_type="latent"
    )
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


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_sd_steps_beyond_the_training_timesteps_are_refused_before_encoding(sd_pipe, spacing):
    """A grid finer than the scheduler's training timesteps repeats them ("trailing", the embedded
    models' spacing, fails in the sampler) or falls between them ("linspace"): refused, with the
    limit, before the text encoder runs."""
    from diffusers import EulerDiscreteScheduler

    original = sd_pipe.scheduler
    sd_pipe.scheduler = EulerDiscreteScheduler.from_config(original.config, timestep_spacing=spacing)
    unet_calls, text_calls = count_calls(sd_pipe.unet), count_calls(sd_pipe.text_encoder)
    try:
        with pytest.raises(ValueError, match=r"^num_inference_steps=5000 is not valid: the network was trained at "
                                             r"1000 timesteps \(EulerDiscreteScheduler.config.num_train_timesteps\).*"
                                             r"use 1000 or fewer"):
            sd_pipe(PROMPTS, num_inference_steps=5000, progress=False, output_type="latent")
    finally:
        sd_pipe.scheduler = original
        for hooks in (sd_pipe.unet._forward_pre_hooks, sd_pipe.text_encoder._forward_pre_hooks):
            hooks.clear()
    assert unet_calls == [] and text_calls == []


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
    sd = StableDiffusionPipeline(
        **{k: getattr(sd_pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.save_pretrained(tmp_path / "sd")
    from_sd = SuperDiffPipeline.from_pretrained(tmp_path / "sd", local_files_only=True, dtype=torch.float32)
    np.testing.assert_array_equal(before.images, from_sd(PROMPTS, **(kw | {"generator": seeded(5)})).images)
    shared = SuperDiffPipeline.from_pipe(sd)
    assert shared.unet is sd.unet and shared.text_encoder is sd.text_encoder and shared.vae is sd.vae
    np.testing.assert_array_equal(before.images, shared(PROMPTS, **(kw | {"generator": seeded(5)})).images)


def test_sd_text_encoding_matches_diffusers(sd_pipe):
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline(
        **{k: getattr(sd_pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
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
    out = pixel_pipe(
        PROMPTS,
        mode="and",
        num_inference_steps=3,
        num_images_per_prompt=2,
        generator=seeded(0),
        output_type="np",
        progress=False,
    )
    assert out.images.shape == (2, 8, 8, 3) and np.isfinite(out.images).all()
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0
    # no VAE: any size (9×7 is not divided by the UNet's ×2 downsampling; it takes it through upsample sizes)
    assert pixel_pipe(
        PROMPTS, num_inference_steps=2, height=9, width=7, output_type="np", progress=False
    ).images.shape == (1, 9, 7, 3)
    with pytest.raises(ValueError, match="^height=0 is not valid: must be a positive multiple of 1"):
        pixel_pipe(PROMPTS, height=0, progress=False)
    pipe64 = SuperDiffPipeline(**pixel_pipe.components).to(torch.float64)
    out, states = run_with_states(
        pipe64,
        PROMPTS,
        mode="and",
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        generator=seeded(2),
        output_type="latent",
        progress=False,
    )
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
# v-prediction, with VP (DDIM, DDPM) and σ-form (Euler) grids
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "euler"])
def test_sd_v_prediction_traces_match_independent_loop(scheduler, tmp_path):
    pipe = SuperDiffPipeline(**tiny_sd_components("v_prediction", scheduler, tokenizer_dir=tmp_path)).to(torch.float64)
    out, states = run_with_states(
        pipe,
        PROMPTS,
        mode="and",
        num_inference_steps=STEPS,
        guidance_scale=6.0,
        num_images_per_prompt=2,
        generator=seeded(9),
        output_type="latent",
        progress=False,
    )
    ref = sd_reference(pipe, PROMPTS, "and", 6.0, 2, 9, vp=scheduler != "euler", states=states)
    assert_traces_match(out, *ref, out.images, rtol=1e-8)
    if scheduler == "ddpm":  # the "leading" grid ends at timestep 0; the last step lands on the clean image
        assert int(out.timesteps[-1]) == 0



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

