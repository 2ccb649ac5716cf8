"""SuperDiffFluxPipeline (FLUX.1: packed latents, CLIP + T5, dynamic shift) on tiny seeded models (CPU, offline):
κ and log-density traces against the independent loop of pipeline_reference.py with diffusers' own Flux text
encoding, σ grid and packing; one batched transformer call per step; sizes and packed latents; loading, dtype=,
and `superdiff generate --model <flux folder>`."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from pipeline_reference import (
    STEPS,
    PerConditionDenoiser,
    assert_traces_match,
    count_calls,
    reference_loop,
    run_with_states,
    seeded,
)

PROMPTS3 = ["a red circle", "a blue square", "a green cross"]
GUIDANCE = 3.5  # the distilled guidance embedding (FluxPipeline's default)
TRUE_CFG = 4.0
NEGATIVE = "a cat"
SIZE = 16  # pixels: VAE factor 2 → 8×8 latents → 16 packed 2×2 patches of 4·4 channels
KW = dict(height=SIZE, width=SIZE, max_sequence_length=8, progress=False)


def tiny_flux_components(tokenizer_dir=None, distilled: bool = True, seed: int = 0) -> dict:
    """FLUX-shaped components, as diffusers' own Flux tests build them (one double and one single
    block, a 3-axis rotary embedding), over the local CLIP vocabulary and an in-memory T5 unigram one:
    a CLIPTextModel (pooled output) and a T5 encoder, a 4-channel tiny VAE with Flux's scaling and
    shift factors, and FLUX.1's scheduler config (dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from superdiff.testing import tiny_clip_text_model, tiny_clip_tokenizer, tiny_t5, tiny_vae

    tokenizer = tiny_clip_tokenizer(tokenizer_dir)
    t5_tokenizer, t5 = tiny_t5(seed + 2, d_model=32)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=distilled,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return dict(
        scheduler=scheduler,
        vae=tiny_vae(latent_channels=4, seed=seed, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=tiny_clip_text_model(tokenizer, hidden_size=32, seed=seed),
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def flux_pipes(tmp_path, distilled=True):
    from diffusers import FluxPipeline

    from superdiff.pipelines import SuperDiffFluxPipeline

    comps = tiny_flux_components(tmp_path, distilled=distilled)
    return SuperDiffFluxPipeline(**comps), FluxPipeline(**comps)


def true_cfg(on: bool) -> dict:
    return dict(true_cfg_scale=TRUE_CFG, negative_prompt=NEGATIVE) if on else {}


@pytest.mark.parametrize("mode, cfg, m", [
    ("and", False, 2), ("or", False, 2), ("and", True, 2), ("or", True, 2), ("and", False, 3), ("or", True, 3),
])
def test_flux_traces_match_independent_loop(mode, cfg, m, tmp_path):
    """The pipeline's κ and log-density traces equal the reference loop's, which calls the transformer once
    per prompt (and once for the negative prompt) on diffusers' own encode_prompt, σ grid and packing."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps

    ours, flux = flux_pipes(tmp_path)
    ours.to(torch.float64)  # the shared modules: flux's too
    prompts = PROMPTS3[:m]
    out, states = run_with_states(
        ours, prompts, mode=mode, num_inference_steps=STEPS, guidance_scale=GUIDANCE, num_images_per_prompt=2,
        generator=seeded(6), output_type="latent", **KW, **true_cfg(cfg),
    )
    config = flux.scheduler.config
    mu = calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    retrieve_timesteps(flux.scheduler, STEPS, "cpu", sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    sigmas = [float(s) for s in flux.scheduler.sigmas.double()]
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == STEPS + 1
    torch.testing.assert_close(out.timesteps, torch.tensor(sigmas[:-1], dtype=torch.float64) * 1000)
    grid = [(1.0 - s, s) for s in sigmas]  # x_t = (1 − t) x₀ + t ε, t = σ
    with torch.no_grad():  # diffusers' own Flux text encoding, one text at a time
        conds = [flux.encode_prompt(p, device="cpu", max_sequence_length=8) for p in prompts + [NEGATIVE]]
        img_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float64)

        def x0(x, i, k):  # velocity u = ε − x₀  ⇒  x̂₀ = x − t u; k = m is the negative prompt
            b = x.shape[0]
            embeds, pooled, text_ids = conds[k]
            u = ours.transformer(
                hidden_states=x, timestep=torch.full((b,), sigmas[i], dtype=torch.float64),
                guidance=torch.full((b,), GUIDANCE, dtype=torch.float64), pooled_projections=pooled.expand(b, -1),
                encoder_hidden_states=embeds.expand(b, -1, -1), txt_ids=text_ids, img_ids=img_ids, return_dict=False,
            )[0]
            return x - sigmas[i] * u

        g = seeded(6)  # FluxPipeline.prepare_latents: unpacked noise (B, C, h, w), then packed
        start = FluxPipeline._pack_latents(torch.randn(2, 4, 8, 8, generator=g), 2, 4, 8, 8).double()
        ref = reference_loop(PerConditionDenoiser(x0, m), grid, start, g, mode, TRUE_CFG if cfg else None,
                             states=states)
    assert out.kappa_trace.shape == (STEPS, 2, m)
    assert_traces_match(out, *ref, out.images, rtol=1e-8)


@pytest.mark.parametrize("cfg", [False, True])
def test_one_batched_transformer_call_per_step_with_the_distilled_guidance(cfg, tmp_path):
    ours, _ = flux_pipes(tmp_path)
    rows, guidance = [], []

    def record(module, args, kwargs):
        rows.append((args[0] if args else kwargs["hidden_states"]).shape[0])
        guidance.append(kwargs["guidance"])

    hook = ours.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = ours(PROMPTS3[:2], num_inference_steps=STEPS, num_images_per_prompt=3, guidance_scale=2.5,
                   output_type="latent", generator=seeded(1), **KW, **true_cfg(cfg))
    finally:
        hook.remove()
    assert rows == [(2 + cfg) * 3] * STEPS  # all prompts (and the negative one) of a step in one call
    assert all(torch.equal(g, torch.full_like(g, 2.5)) for g in guidance)
    assert ours.guidance_scale == 2.5 and ours.true_cfg_scale == (TRUE_CFG if cfg else 1.0)
    assert out.images.shape == (3, 16, 16)  # diffusers' packed latents


def test_no_nan_from_sigma_one_schnell_like_and_true_cfg_at_most_one(tmp_path):
    """From σ = 1 (α = 0) every mode stays finite, with and without true CFG, and on a transformer with no
    guidance input (FLUX.1-schnell-like, guidance_scale ignored); true_cfg_scale ≤ 1 is no guidance (the
    negative row is not evaluated), bit for bit the call without it."""
    ours, _ = flux_pipes(tmp_path / "dev")
    kw = dict(num_inference_steps=3, num_images_per_prompt=2, output_type="np", **KW)
    for mode, cfg in [("and", False), ("or", False), ("average", False), ("sum", True), ("and", True)]:
        out = ours(PROMPTS3[:2], mode=mode, generator=seeded(0), **kw, **true_cfg(cfg))
        assert float(out.timesteps[0]) == 1000.0  # σ = 1, α = 0
        assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all()
        assert torch.isfinite(out.log_density_trace).all() and torch.isfinite(out.kappa_trace).all()
    calls = count_calls(ours.transformer)
    plain = ours(PROMPTS3[:2], generator=seeded(0), **kw).images
    for scale in (1.0, 0.5, None):
        unguided = ours(PROMPTS3[:2], generator=seeded(0), true_cfg_scale=scale, **kw).images
        np.testing.assert_array_equal(plain, unguided)
    assert len(calls) == 4 * 3
    assert not np.array_equal(plain, ours(PROMPTS3[:2], generator=seeded(0), guidance_scale=1.0, **kw).images)
    schnell, _ = flux_pipes(tmp_path / "schnell", distilled=False)
    seen = []
    schnell.transformer.register_forward_pre_hook(lambda mod, a, k: seen.append(k.get("guidance")), with_kwargs=True)
    out = schnell(PROMPTS3[:2], mode="or", generator=seeded(0), guidance_scale=0.0, **kw, **true_cfg(True))
    assert np.isfinite(out.images).all() and seen == [None] * 3
    np.testing.assert_array_equal(
        out.images, schnell(PROMPTS3[:2], mode="or", generator=seeded(0), guidance_scale=None, **kw,
                            **true_cfg(True)).images)
    assert schnell.guidance_scale is None


def test_sizes_and_packed_latents_as_diffusers_takes_them(tmp_path):
    """Sizes that are not multiples of 2 × the VAE factor are refused, naming the size diffusers' FluxPipeline
    would round them down to; packed latents (diffusers' latents=) are taken as given, and the generator's own
    draw is the unpacked noise packed, as FluxPipeline.prepare_latents draws it; unpacked latents are refused."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    ours, flux = flux_pipes(tmp_path)
    calls = count_calls(ours.transformer)
    for side in (18, 15, 3):
        rounded = max(4, 2 * (side // (flux.vae_scale_factor * 2)) * flux.vae_scale_factor)
        with pytest.raises(ValueError, match=rf"^height={side} is not valid: must be a positive multiple of 4.*e\.g\. "
                                             rf"{rounded}$"):
            ours(PROMPTS3[:2], **(KW | dict(height=side)))
    with pytest.raises(ValueError, match=r"^latents=<a tensor of shape \(1, 4, 8, 8\)> .* shape \(1, 16, 16\)"):
        ours(PROMPTS3[:2], latents=torch.randn(1, 4, 8, 8), **KW)
    assert calls == []
    g = seeded(5)
    packed = FluxPipeline._pack_latents(torch.randn(2, 4, 8, 8, generator=g), 2, 4, 8, 8)
    kw = dict(num_inference_steps=3, num_images_per_prompt=2, output_type="latent", **KW)
    given = ours(PROMPTS3[:2], latents=packed, generator=g, **kw)  # g continues: it drives the steps' noise
    drawn = ours(PROMPTS3[:2], generator=seeded(5), **kw)
    torch.testing.assert_close(given.images, drawn.images, rtol=0, atol=0)
    torch.testing.assert_close(given.kappa_trace, drawn.kappa_trace, rtol=0, atol=0)
    # a non-square size: (h/2)·(w/2) patches, image ids over the h/2 × w/2 grid
    wide = ours(PROMPTS3[:2], **(kw | dict(height=8, width=24)))
    assert wide.images.shape == (2, 2 * 6, 16)
    assert ours(PROMPTS3[:2], **(KW | dict(height=8, width=24, num_inference_steps=2))).images[0].size == (24, 8)


@pytest.mark.parametrize("bad, argument", [
    (dict(negative_prompt="a cat"), "negative_prompt"),  # true CFG off (true_cfg_scale 1)
    (dict(true_cfg_scale=4.0), "true_cfg_scale"),  # true CFG on with nothing to steer from
    (dict(true_cfg_scale=-1.0, negative_prompt="a cat"), "true_cfg_scale"),
    (dict(true_cfg_scale=float("nan"), negative_prompt="a cat"), "true_cfg_scale"),
    (dict(guidance_scale=None), "guidance_scale"),  # the distilled transformer needs its guidance input
    (dict(guidance_scale=-2.0), "guidance_scale"),
    (dict(guidance_scale=1e300), "guidance_scale"),  # the embedding of guidance × 1000 loses its phase, then overflows
    # unguided weights that do not sum to 1 at σ = 1: named by the composition, not by the default true_cfg_scale
    (dict(mode="sum"), r"the combiner's weights \(1.0, 1.0\) sum to 2: without guidance"),
    (dict(max_sequence_length=513), "max_sequence_length"),
    (dict(width=10), "width"),
    (dict(prompt_embeds=torch.zeros(1, 8, 32)), "prompt_embeds"),
    (dict(prompts=["a cat"]), "prompts"),
])
def test_bad_arguments_are_refused_before_any_network_call(bad, argument, tmp_path):
    ours, _ = flux_pipes(tmp_path)
    networks = [ours.transformer, ours.text_encoder, ours.text_encoder_2]
    calls = [count_calls(n) for n in networks]
    with pytest.raises(ValueError, match=f"^{argument}" + ("" if argument.startswith("the ") else "=")):
        ours(**(dict(prompts=PROMPTS3[:2]) | KW | bad))
    assert all(c == [] for c in calls)


def test_loading_from_pipe_round_trip_and_dtype(tmp_path):
    """A saved FluxPipeline is read as Flux (pipeline_class_for, from_pretrained; other families' classes refuse
    it); from_pipe shares the modules; a save/load round trip samples the same images; dtype= casts silently,
    torch_dtype= casts with diffusers' FutureWarning, both at once is refused before anything is read."""
    from superdiff.pipelines import SuperDiffFluxPipeline, SuperDiffPipeline, pipeline_class_for

    ours, flux = flux_pipes(tmp_path / "tok")
    flux.save_pretrained(tmp_path / "flux")
    ours.save_pretrained(tmp_path / "ours")
    assert pipeline_class_for(tmp_path / "flux") is SuperDiffFluxPipeline
    with pytest.raises(ValueError, match="is a FluxPipeline .*SuperDiffPipeline cannot load.*SuperDiffFluxPipeline"):
        SuperDiffPipeline.from_pretrained(tmp_path / "flux", local_files_only=True)
    kw = dict(num_inference_steps=2, output_type="np", generator=seeded(0), **KW)
    expected = ours(PROMPTS3[:2], **kw).images
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # dtype= is diffusers' name: no deprecation warning
        loaded = SuperDiffFluxPipeline.from_pretrained(tmp_path / "flux", local_files_only=True, dtype=torch.float32)
        shared = SuperDiffFluxPipeline.from_pipe(flux, dtype=torch.float32)
    assert shared.transformer is flux.transformer and shared.text_encoder_2 is flux.text_encoder_2
    np.testing.assert_array_equal(expected, loaded(PROMPTS3[:2], **(kw | dict(generator=seeded(0)))).images)
    with pytest.warns(FutureWarning, match="`torch_dtype` is deprecated.*use `dtype`") as record:
        wide = SuperDiffFluxPipeline.from_pretrained(tmp_path / "flux", local_files_only=True,
                                                     torch_dtype=torch.float64)
    # pointing at the caller's line, as diffusers' warning does
    assert [w.filename for w in record if "torch_dtype" in str(w.message)] == [__file__]
    assert wide.transformer.dtype == torch.float64 and wide.text_encoder_2.dtype == torch.float64
    for call in (SuperDiffFluxPipeline.from_pretrained, SuperDiffPipeline.from_pretrained):
        with pytest.raises(ValueError, match=r"^dtype=torch.float32 and torch_dtype=torch.float64 are not valid "
                                             r"together.*pass dtype= only"):
            call(tmp_path / "no-such-folder", dtype=torch.float32, torch_dtype=torch.float64)
    assert pipeline_class_for(tmp_path / "ours") is SuperDiffFluxPipeline
    again = SuperDiffFluxPipeline.from_pretrained(tmp_path / "ours", local_files_only=True)
    np.testing.assert_array_equal(expected, again(PROMPTS3[:2], **(kw | dict(generator=seeded(0)))).images)
    with pytest.warns(FutureWarning, match="torch_dtype"):  # from_pipe casts the shared modules: last
        assert SuperDiffFluxPipeline.from_pipe(flux, torch_dtype=torch.float64).transformer.dtype == torch.float64


def test_generate_composes_on_a_flux_folder(tmp_path):
    """`superdiff generate --model <flux folder>`: read as a FluxPipeline from its model_index.json, sampled with
    FluxPipeline's distilled guidance default, images and sidecars written."""
    from click.testing import CliRunner

    from superdiff_cli.main import cli

    _, flux = flux_pipes(tmp_path / "tok")
    flux.save_pretrained(tmp_path / "flux")
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, [
        "generate", "--model", str(tmp_path / "flux"), "--and", "a red circle", "--and", "a blue square", "--steps",
        "2", "--num-images", "2", "--height", "16", "--width", "16", "--dtype", "float32", "--out", str(out),
        "--quiet",
    ])
    assert r.exit_code == 0, r.output
    side = json.loads((out / "image_001.json").read_text())
    assert side["model"] == str(tmp_path / "flux") and side["guidance"] == GUIDANCE and side["mode"] == "and"
    assert side["pipeline"] == "SuperDiffFluxPipeline" and "true_cfg_scale" not in side
    cfg = tmp_path / "cfg"
    r = CliRunner().invoke(cli, [
        "generate", "--model", str(tmp_path / "flux"), "--and", "a red circle", "--and", "a blue square", "--steps",
        "2", "--num-images", "2", "--height", "16", "--width", "16", "--dtype", "float32", "--out", str(cfg),
        "--quiet", "--true-cfg-scale", str(TRUE_CFG), "--negative-prompt", NEGATIVE,
    ])
    assert r.exit_code == 0, r.output
    guided = json.loads((cfg / "image_001.json").read_text())
    assert guided["true_cfg_scale"] == TRUE_CFG and guided["negative_prompt"] == NEGATIVE
    assert guided["kappa_trace"] != side["kappa_trace"]  # the guided path differs
    r = CliRunner().invoke(cli, ["generate", "--model", "embedded-shapes", "--and", "red", "--and", "circle",
                                 "--true-cfg-scale", "4", "--out", str(tmp_path / "no")])
    assert r.exit_code == 2 and "--true-cfg-scale applies to FLUX.1 and Qwen-Image models" in r.output, r.output
    assert len(side["kappa_trace"]) == 2 and (out / "image_000.png").exists() and (out / "grid.png").exists()


def test_expressions_and_particles_on_flux(tmp_path):
    """An And of two leaves is mode="and" to the bit; a product (degree 2) is refused unguided, as the sum
    is; a corrected soft-min on particles returns one image per prompt set with finite weights, and image
    k of a list of generators is the single-image call with the list [generator k], particles and all."""
    pipe, _ = flux_pipes(tmp_path)
    common = dict(KW, guidance_scale=GUIDANCE, num_inference_steps=STEPS, output_type="latent")
    flat = pipe(prompts=PROMPTS3[:2], mode="and", generator=torch.Generator().manual_seed(3), **common)
    tree = pipe(expression=f'"{PROMPTS3[0]}" & "{PROMPTS3[1]}"', generator=torch.Generator().manual_seed(3), **common)
    assert torch.equal(flat.images, tree.images) and torch.equal(flat.kappa_trace, tree.kappa_trace)

    with pytest.raises(ValueError, match="an expression whose degree is not 1, such as a product of two") as caught:
        pipe(expression=f'"{PROMPTS3[0]}" * "{PROMPTS3[1]}"', **common)  # unguided flow starts at σ = 1
    # The message names what is wrong (the composition), not the true_cfg_scale the user left at its default.
    product = f'product("{PROMPTS3[0]}", "{PROMPTS3[1]}")'
    assert str(caught.value).startswith(f"the expression {product!r} has degree 2:")
    assert "true_cfg_scale above 1 (e.g. 4.0; it is 1.0)" in str(caught.value)
    text = f'softmin("{PROMPTS3[0]}", "{PROMPTS3[1]}")[sharpness=4]'  # degree 1, corrected: weighted particles
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    both = pipe(expression=text, particles=3, num_images_per_prompt=2, generator=gens, **common)
    assert both.images.shape[0] == 2 and torch.isfinite(both.images).all()
    assert torch.isfinite(both.log_weights).all() and (both.log_weights <= 1e-9).all()
    assert both.ess_trace.shape[1] == 2 and ((both.ess_trace >= 1 - 1e-6) & (both.ess_trace <= 3 + 1e-6)).all()
    second = pipe(expression=text, particles=3, generator=[torch.Generator().manual_seed(6)], **common)
    assert torch.allclose(both.images[1], second.images[0], atol=1e-5)
    with pytest.raises(ValueError, match="latents give one starting point per image"):
        pipe(expression=text, particles=3, latents=both.images, **common)
