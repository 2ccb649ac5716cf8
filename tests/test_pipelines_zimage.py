"""SuperDiffZImagePipeline (Z-Image: a Qwen3 text encoder with a chat template, a list-taking transformer that
predicts x₀ − ε at timestep 1 − σ, guidance pos + g(pos − neg); Z-Image-Turbo unguided) on tiny seeded models
(CPU, offline): κ and log-density traces against the independent loop of pipeline_reference.py, which encodes
each text alone with diffusers' own ZImagePipeline.encode_prompt and calls the transformer once per text as
ZImagePipeline does; one batched transformer call per step; sizes; loading, from_pipe and
`superdiff generate --model <z-image folder>`."""

from __future__ import annotations

import json

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

PROMPTS3 = ["a red circle", "a small blue square on the left", "a green cross"]  # 3, 7 and 3 tokens
GUIDANCE = 3.0  # ZImagePipeline's g: weight 1 + g on the κ-mixture
NEGATIVE = "a cat"
SIZE = 16  # pixels: VAE factor 2 → 8×8 latents of 4 channels, 2×2 patches
KW = dict(height=SIZE, width=SIZE, max_sequence_length=32, progress=False)


def z_pipes(tmp_path):
    from diffusers import ZImagePipeline

    from superdiff.pipelines import SuperDiffZImagePipeline
    from superdiff.testing import tiny_zimage_components

    comps = tiny_zimage_components(tokenizer_dir=tmp_path / "z-tokenizer")
    return SuperDiffZImagePipeline(**comps), ZImagePipeline(**comps)


def guided(on: bool) -> dict:
    return dict(guidance_scale=GUIDANCE, negative_prompt=NEGATIVE) if on else dict(guidance_scale=0.0)


@pytest.mark.parametrize("mode, cfg, m", [
    ("and", False, 2), ("or", False, 2), ("and", True, 2), ("or", True, 2), ("and", False, 3), ("or", True, 3),
])
def test_zimage_traces_match_independent_loop(mode, cfg, m, tmp_path):
    from diffusers.pipelines.z_image.pipeline_z_image import (
        calculate_shift,
        get_default_z_image_sigmas,
        retrieve_timesteps,
    )

    ours, z = z_pipes(tmp_path)
    ours.to(torch.float64)  # the shared modules: z's too
    prompts = PROMPTS3[:m]
    out, states = run_with_states(ours, prompts, mode=mode, num_inference_steps=STEPS, num_images_per_prompt=2,
                                  generator=seeded(6), output_type="latent", **KW, **guided(cfg))
    config = z.scheduler.config
    mu = calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    timesteps, _ = retrieve_timesteps(z.scheduler, STEPS, "cpu", sigmas=get_default_z_image_sigmas(STEPS), mu=mu)
    sigmas = [float(s) for s in z.scheduler.sigmas.double()]
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == STEPS + 1
    torch.testing.assert_close(out.timesteps, torch.tensor(sigmas[:-1], dtype=torch.float64) * 1000)
    network_times = 1 - torch.tensor(sigmas[:-1], dtype=torch.float64)  # ZImagePipeline's (1000 − t)/1000
    torch.testing.assert_close((1000 - timesteps.double()) / 1000, network_times, rtol=0, atol=1e-6)
    grid = [(1.0 - s, s) for s in sigmas]  # x_t = (1 − t) x₀ + t ε, t = σ
    with torch.no_grad():  # diffusers' own text encoding, one text at a time
        conds = [z.encode_prompt(p, device="cpu", do_classifier_free_guidance=False, max_sequence_length=32)[0][0]
                 for p in prompts + [NEGATIVE]]
        assert len({c.shape[0] for c in conds}) > 1

        def x0(x, i, k):  # as ZImagePipeline: timestep 1 − σ, velocity = −output; k = m: the negative prompt
            b = x.shape[0]
            t = torch.full((b,), 1 - sigmas[i], dtype=torch.float32)  # ZImagePipeline's (1000 − t)/1000, unrounded
            out = ours.transformer(list(x.unsqueeze(2).unbind(0)), t, [conds[k]] * b, return_dict=False)[0]
            return x + sigmas[i] * torch.stack(out).squeeze(2)

        g = seeded(6)  # ZImagePipeline.prepare_latents: noise (B, C, h, w)
        start = torch.randn(2, 4, 8, 8, generator=g).double()
        ref = reference_loop(PerConditionDenoiser(x0, m), grid, start, g, mode, 1 + GUIDANCE if cfg else None,
                             states=states)
    assert out.kappa_trace.shape == (STEPS, 2, m)
    assert_traces_match(out, *ref, out.images, rtol=1e-8)


@pytest.mark.parametrize("cfg", [False, True])
def test_one_batched_transformer_call_per_step_and_one_text_encoding(cfg, tmp_path):
    ours, _ = z_pipes(tmp_path)
    rows, captions = [], []

    def record(module, args, kwargs):
        rows.append(len(args[0]))
        captions.append([c.shape[0] for c in args[2]])

    ours.transformer.register_forward_pre_hook(record, with_kwargs=True)
    encodings = count_calls(ours.text_encoder)
    out = ours(PROMPTS3[:2], num_inference_steps=STEPS, num_images_per_prompt=3, output_type="latent",
               generator=seeded(1), **KW, **guided(cfg))
    assert rows == [(2 + cfg) * 3] * STEPS  # all prompts (and the negative one) of a step in one call
    assert len(encodings) == 1  # every text of the call in one text-encoder call
    lengths = captions[0]  # each row's caption at its own length, prompt k on rows k·B … k·B + B − 1
    assert lengths[:3] == [lengths[0]] * 3 and lengths[3:6] == [lengths[3]] * 3 and lengths[0] != lengths[3]
    assert ours.guidance_scale == (GUIDANCE if cfg else 0.0)
    assert out.images.shape == (3, 4, 8, 8)


def test_turbo_no_nan_from_sigma_one_and_guidance_above_zero(tmp_path):
    """From σ = 1 (α = 0) every mode stays finite, with and without guidance; guidance_scale 0 (Z-Image-Turbo)
    evaluates no unconditional row, and any g > 0 guides (ZImagePipeline's rule), with weight 1 + g."""
    ours, _ = z_pipes(tmp_path)
    kw = dict(num_inference_steps=3, num_images_per_prompt=2, output_type="np", **KW)
    for mode, cfg in [("and", False), ("or", False), ("average", False), ("sum", True), ("and", True)]:
        out = ours(PROMPTS3[:2], mode=mode, generator=seeded(0), **kw, **guided(cfg))
        assert float(out.timesteps[0]) == 1000.0  # σ = 1, α = 0
        assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all()
        assert torch.isfinite(out.log_density_trace).all() and torch.isfinite(out.kappa_trace).all()
    rows = []
    ours.transformer.register_forward_pre_hook(lambda mod, args: rows.append(len(args[0])))
    ours(PROMPTS3[:2], generator=seeded(0), **kw, **guided(False))
    ours(PROMPTS3[:2], generator=seeded(0), guidance_scale=0.5, **kw)
    assert rows == [4] * 3 + [6] * 3


def test_sizes_as_diffusers_takes_them(tmp_path):
    """Multiples of 2 × the VAE factor (non-square too) are sampled, as ZImagePipeline requires; others are refused
    before any network call, naming a size to use."""
    ours, _ = z_pipes(tmp_path)
    calls = count_calls(ours.transformer)
    for side, use in ((18, 16), (6, 4), (3, 4)):
        with pytest.raises(ValueError, match=rf"^height={side} is not valid: must be a positive multiple of 4.*e\.g\. "
                                             rf"{use}$"):
            ours(PROMPTS3[:2], **(KW | dict(height=side)))
    assert calls == []
    kw = dict(num_inference_steps=2, num_images_per_prompt=2, **KW, **guided(False))
    assert ours(PROMPTS3[:2], output_type="latent", **(kw | dict(height=8, width=24))).images.shape == (2, 4, 4, 12)
    assert ours(PROMPTS3[:2], **(kw | dict(height=8, width=24))).images[0].size == (24, 8)


@pytest.mark.parametrize("bad, argument", [
    (dict(negative_prompt="a cat", guidance_scale=0.0), "negative_prompt"),  # guidance off
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(guidance_scale=None), "guidance_scale"),
    (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(mode="sum", guidance_scale=0.0), r"the combiner's weights \(1.0, 1.0\) sum to 2: without guidance"),
    (dict(max_sequence_length=513), "max_sequence_length"),
    (dict(width=10), "width"),
    (dict(prompt_embeds=torch.zeros(1, 8, 16)), "prompt_embeds"),
])
def test_bad_arguments_are_refused_before_any_network_call(bad, argument, tmp_path):
    ours, _ = z_pipes(tmp_path)
    calls = [count_calls(n) for n in (ours.transformer, ours.text_encoder)]
    with pytest.raises(ValueError, match=f"^{argument}" if argument.startswith("the ") else argument):
        ours(**(dict(prompts=PROMPTS3[:2]) | KW | bad))
    assert all(c == [] for c in calls)
    with pytest.raises(TypeError, match="'cfg_normalization' is not a sampling option"):  # not silently ignored
        ours(prompts=PROMPTS3[:2], cfg_normalization=True, **KW)


def test_loading_from_pipe_and_generate_on_a_zimage_folder(tmp_path):
    """A saved ZImagePipeline folder is read as Z-Image (pipeline_class_for, from_pretrained with
    local_files_only); from_pipe shares the modules and samples what the loaded pipeline samples, as
    compose(z_pipe, ...) does; `superdiff generate --model <folder>` composes on it (ZImagePipeline's guidance
    5 by default, --guidance 0 for Turbo), its sidecar naming the adapter; a size that is not a multiple of 4
    and --true-cfg-scale are refused before the weights load."""
    from click.testing import CliRunner

    from superdiff.pipelines import SuperDiffPipeline, SuperDiffZImagePipeline, compose, pipeline_class_for
    from superdiff_cli.main import cli

    _, z = z_pipes(tmp_path)
    folder = tmp_path / "z"
    z.save_pretrained(folder)
    assert pipeline_class_for(folder) is SuperDiffZImagePipeline
    with pytest.raises(ValueError, match="is a ZImagePipeline .*SuperDiffPipeline cannot load"):
        SuperDiffPipeline.from_pretrained(folder, local_files_only=True)
    loaded = SuperDiffZImagePipeline.from_pretrained(folder, local_files_only=True)
    shared = SuperDiffZImagePipeline.from_pipe(z)
    assert shared.transformer is z.transformer and shared.text_encoder is z.text_encoder
    kw = dict(num_inference_steps=2, output_type="np", **KW, **guided(True))
    expected = shared(PROMPTS3[:2], generator=seeded(0), **kw).images
    np.testing.assert_array_equal(expected, loaded(PROMPTS3[:2], generator=seeded(0), **kw).images)
    np.testing.assert_array_equal(expected, compose(z, PROMPTS3[:2], generator=seeded(0), **kw).images)

    args = ["generate", "--model", str(folder), "--or", "a red circle", "--or", "a blue square", "--steps", "2",
            "--num-images", "2", "--height", "16", "--width", "16", "--dtype", "float32", "--quiet"]
    r = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "default")])
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "default" / "image_001.json").read_text())
    assert side["pipeline"] == "SuperDiffZImagePipeline" and side["mode"] == "or" and side["guidance"] == 5.0
    r = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "turbo"), "--guidance", "0"])
    assert r.exit_code == 0, r.output
    turbo = json.loads((tmp_path / "turbo" / "image_001.json").read_text())
    assert turbo["guidance"] == 0.0 and turbo["kappa_trace"] != side["kappa_trace"]

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded")

    SuperDiffZImagePipeline.from_pretrained = no_loading
    try:
        r = CliRunner().invoke(cli, args[:-7] + ["--width", "18", "--out", str(tmp_path / "no")])
        assert r.exit_code == 2 and "--width 18 is not a multiple of 4" in r.output and "--width 16" in r.output
        r = CliRunner().invoke(cli, args + ["--true-cfg-scale", "4", "--out", str(tmp_path / "no")])
        assert r.exit_code == 2 and "--true-cfg-scale applies to FLUX.1 and Qwen-Image" in r.output, r.output
    finally:
        del SuperDiffZImagePipeline.from_pretrained


def test_expressions_and_particles_on_zimage(tmp_path):
    """An And of two leaves is mode="and" to the bit; a product (degree 2) is refused unguided (Turbo) and sampled
    with guidance; a corrected soft-min on particles returns one image per prompt set with finite weights, and
    image k of a list of generators is the single-image call with the list [generator k], particles and all."""
    pipe, _ = z_pipes(tmp_path)
    common = dict(KW, num_inference_steps=STEPS, output_type="latent")
    flat = pipe(prompts=PROMPTS3[:2], mode="and", generator=seeded(3), **common)
    tree = pipe(expression=f'"{PROMPTS3[0]}" & "{PROMPTS3[1]}"', generator=seeded(3), **common)
    assert torch.equal(flat.images, tree.images) and torch.equal(flat.kappa_trace, tree.kappa_trace)
    product = f'"{PROMPTS3[0]}" * "{PROMPTS3[1]}"'
    with pytest.raises(ValueError, match=r"has degree 2: .*guidance_scale above 0 \(e.g. 5.0; it is 0.0\)"):
        pipe(expression=product, **common, **guided(False))
    assert torch.isfinite(pipe(expression=product, generator=seeded(3), **common).images).all()
    text = f'softmin("{PROMPTS3[0]}", "{PROMPTS3[1]}")[sharpness=4]'  # degree 1, corrected: weighted particles
    turbo = dict(common, **guided(False))
    both = pipe(expression=text, particles=3, num_images_per_prompt=2, generator=[seeded(5), seeded(6)], **turbo)
    assert both.images.shape[0] == 2 and torch.isfinite(both.images).all()
    assert torch.isfinite(both.log_weights).all() and (both.log_weights <= 1e-9).all()
    second = pipe(expression=text, particles=3, generator=[seeded(6)], **turbo)
    assert torch.allclose(both.images[1], second.images[0], atol=1e-5)
