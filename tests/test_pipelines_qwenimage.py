"""SuperDiffQwenImagePipeline (Qwen-Image: packed latents, a Qwen2.5-VL text encoder with Qwen-Image's prompt
template, true CFG with a negative prompt) on tiny seeded models (CPU, offline): κ and log-density traces
against the independent loop of pipeline_reference.py, which encodes each text alone with diffusers' own
QwenImagePipeline.encode_prompt (no padding, no mask) and calls the transformer once per text; one batched
transformer call per step; sizes; loading, from_pipe and `superdiff generate --model <qwen folder>`."""

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

# Prompts of different token counts (3, 7 and 3), so the batched call pads its rows and masks the padding.
PROMPTS3 = ["a red circle", "a small blue square on the left", "a green cross"]
TRUE_CFG = 4.0
NEGATIVE = "a cat"
SIZE = 16  # pixels: VAE factor 2 → 8×8 latents → 16 packed 2×2 patches of 4·4 channels
KW = dict(height=SIZE, width=SIZE, max_sequence_length=16, progress=False)


def qwen_pipes(tmp_path):
    from diffusers import QwenImagePipeline

    from superdiff.pipelines import SuperDiffQwenImagePipeline
    from superdiff.testing import tiny_qwenimage_components

    comps = tiny_qwenimage_components(tokenizer_dir=tmp_path / "qwen-tokenizer")
    return SuperDiffQwenImagePipeline(**comps), QwenImagePipeline(**comps)


def true_cfg(on: bool) -> dict:
    return dict(true_cfg_scale=TRUE_CFG, negative_prompt=NEGATIVE) if on else {}


@pytest.mark.parametrize("mode, cfg, m", [
    ("and", False, 2), ("or", False, 2), ("and", True, 2), ("or", True, 2), ("and", False, 3), ("or", True, 3),
])
def test_qwenimage_traces_match_independent_loop(mode, cfg, m, tmp_path):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import (
        QwenImagePipeline,
        calculate_shift,
        retrieve_timesteps,
    )

    ours, qwen = qwen_pipes(tmp_path)
    ours.to(torch.float64)  # the shared modules: qwen's too
    prompts = PROMPTS3[:m]
    out, states = run_with_states(ours, prompts, mode=mode, num_inference_steps=STEPS, num_images_per_prompt=2,
                                  generator=seeded(6), output_type="latent", **KW, **true_cfg(cfg))
    config = qwen.scheduler.config
    mu = calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    retrieve_timesteps(qwen.scheduler, STEPS, "cpu", sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    sigmas = [float(s) for s in qwen.scheduler.sigmas.double()]
    assert sigmas[0] == 1.0 and sigmas[-2] == pytest.approx(0.02) and sigmas[-1] == 0.0  # shift_terminal
    torch.testing.assert_close(out.timesteps, torch.tensor(sigmas[:-1], dtype=torch.float64) * 1000)
    grid = [(1.0 - s, s) for s in sigmas]  # x_t = (1 − t) x₀ + t ε, t = σ
    with torch.no_grad():  # diffusers' own text encoding, one text at a time: no padding, no mask
        conds = [qwen.encode_prompt(p, device="cpu", max_sequence_length=16) for p in prompts + [NEGATIVE]]
        assert all(mask is None for _, mask in conds) and len({e.shape[1] for e, _ in conds}) > 1

        def x0(x, i, k):  # velocity u = ε − x₀  ⇒  x̂₀ = x − t u; k = m is the negative prompt
            b = x.shape[0]
            u = ours.transformer(hidden_states=x, timestep=torch.full((b,), sigmas[i], dtype=torch.float64),
                                 encoder_hidden_states=conds[k][0].expand(b, -1, -1), img_shapes=[[(1, 4, 4)]] * b,
                                 return_dict=False)[0]
            return x - sigmas[i] * u

        g = seeded(6)  # QwenImagePipeline.prepare_latents: noise (B, 1, C, h, w), then packed
        start = QwenImagePipeline._pack_latents(torch.randn(2, 1, 4, 8, 8, generator=g), 2, 4, 8, 8).double()
        ref = reference_loop(PerConditionDenoiser(x0, m), grid, start, g, mode, TRUE_CFG if cfg else None,
                             states=states)
    assert out.kappa_trace.shape == (STEPS, 2, m)
    assert_traces_match(out, *ref, out.images, rtol=1e-8)


@pytest.mark.parametrize("cfg", [False, True])
def test_one_batched_transformer_call_per_step_and_one_text_encoding(cfg, tmp_path):
    ours, _ = qwen_pipes(tmp_path)
    rows, masks = [], []

    def record(module, args, kwargs):
        rows.append(kwargs["hidden_states"].shape[0] if "hidden_states" in kwargs else args[0].shape[0])
        masks.append(kwargs.get("encoder_hidden_states_mask"))

    ours.transformer.register_forward_pre_hook(record, with_kwargs=True)
    encodings = count_calls(ours.text_encoder)
    out = ours(PROMPTS3[:2], num_inference_steps=STEPS, num_images_per_prompt=3, output_type="latent",
               generator=seeded(1), **KW, **true_cfg(cfg))
    assert rows == [(2 + cfg) * 3] * STEPS  # all prompts (and the negative one) of a step in one call
    assert len(encodings) == 1  # every text of the call in one text-encoder call
    assert all(mask is not None and mask.shape[0] == (2 + cfg) * 3 for mask in masks)  # unequal lengths: masked
    assert ours.true_cfg_scale == (TRUE_CFG if cfg else None)
    assert out.images.shape == (3, 16, 16)  # diffusers' packed latents


def test_no_nan_from_sigma_one_and_true_cfg_only_with_a_negative_prompt(tmp_path):
    """From σ = 1 (α = 0) every mode stays finite, with and without true CFG; as in QwenImagePipeline, true CFG
    runs only with a negative prompt: the default true_cfg_scale (4) without one, and true_cfg_scale ≤ 1, are
    the unguided call bit for bit (the negative row is not evaluated); decoded images come from the 3-D VAE."""
    ours, _ = qwen_pipes(tmp_path)
    kw = dict(num_inference_steps=3, num_images_per_prompt=2, output_type="np", **KW)
    for mode, cfg in [("and", False), ("or", False), ("average", False), ("sum", True), ("and", True)]:
        out = ours(PROMPTS3[:2], mode=mode, generator=seeded(0), **kw, **true_cfg(cfg))
        assert float(out.timesteps[0]) == 1000.0  # σ = 1, α = 0
        assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all()
        assert torch.isfinite(out.log_density_trace).all() and torch.isfinite(out.kappa_trace).all()
    calls = count_calls(ours.transformer)
    plain = ours(PROMPTS3[:2], generator=seeded(0), **kw).images
    for scale in (1.0, 0.5, TRUE_CFG):
        unguided = ours(PROMPTS3[:2], generator=seeded(0), true_cfg_scale=scale, **kw).images
        np.testing.assert_array_equal(plain, unguided)
    assert len(calls) == 4 * 3
    guided = ours(PROMPTS3[:2], generator=seeded(0), **kw, **true_cfg(True)).images
    assert not np.array_equal(plain, guided)


def test_sizes_as_diffusers_takes_them(tmp_path):
    """Multiples of 2 × the VAE factor (non-square too) are sampled; others are refused before any network call,
    naming the size QwenImagePipeline would round them down to."""
    ours, qwen = qwen_pipes(tmp_path)
    calls = count_calls(ours.transformer)
    for side in (18, 15, 3):
        rounded = max(4, 2 * (side // (qwen.vae_scale_factor * 2)) * qwen.vae_scale_factor)
        with pytest.raises(ValueError, match=rf"^height={side} is not valid: must be a positive multiple of 4.*e\.g\. "
                                             rf"{rounded}$"):
            ours(PROMPTS3[:2], **(KW | dict(height=side)))
    assert calls == []
    kw = dict(num_inference_steps=2, num_images_per_prompt=2, **KW)
    wide = ours(PROMPTS3[:2], output_type="latent", **(kw | dict(height=8, width=24)))
    assert wide.images.shape == (2, 2 * 6, 16)
    assert ours(PROMPTS3[:2], **(kw | dict(height=8, width=24))).images[0].size == (24, 8)


@pytest.mark.parametrize("bad, argument", [
    (dict(negative_prompt="a cat", true_cfg_scale=1.0), "negative_prompt"),  # true CFG off
    (dict(true_cfg_scale=-1.0, negative_prompt="a cat"), "true_cfg_scale"),
    (dict(true_cfg_scale=float("nan"), negative_prompt="a cat"), "true_cfg_scale"),
    (dict(guidance_scale=3.5), "guidance_scale"),  # no distilled guidance input
    # unguided weights that do not sum to 1 at σ = 1: named by the composition
    (dict(mode="sum"), r"the combiner's weights \(1.0, 1.0\) sum to 2: without guidance"),
    (dict(max_sequence_length=1025), "max_sequence_length"),
    (dict(width=10), "width"),
    (dict(prompt_embeds=torch.zeros(1, 8, 16)), "prompt_embeds"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), "latents"),
])
def test_bad_arguments_are_refused_before_any_network_call(bad, argument, tmp_path):
    ours, _ = qwen_pipes(tmp_path)
    calls = [count_calls(n) for n in (ours.transformer, ours.text_encoder)]
    with pytest.raises(ValueError, match=f"^{argument}" + ("" if argument.startswith("the ") else "=")):
        ours(**(dict(prompts=PROMPTS3[:2]) | KW | bad))
    assert all(c == [] for c in calls)


def test_loading_from_pipe_and_generate_on_a_qwenimage_folder(tmp_path):
    """A saved QwenImagePipeline folder is read as Qwen-Image (pipeline_class_for, from_pretrained with
    local_files_only; SuperDiffFluxPipeline refuses it before reading weights); from_pipe shares the modules
    and samples what the loaded pipeline samples, as compose(qwen_pipe, ...) does; `superdiff generate
    --model <folder>` composes on it, with true CFG from --true-cfg-scale and --negative-prompt, its sidecar
    naming the adapter; a size that is not a multiple of 4 and --guidance are refused before the weights load."""
    from click.testing import CliRunner

    from superdiff.pipelines import SuperDiffFluxPipeline, SuperDiffQwenImagePipeline, compose, pipeline_class_for
    from superdiff_cli.main import cli

    ours, qwen = qwen_pipes(tmp_path)
    folder = tmp_path / "qwen"
    qwen.save_pretrained(folder)
    assert pipeline_class_for(folder) is SuperDiffQwenImagePipeline
    with pytest.raises(ValueError, match="is a QwenImagePipeline .*SuperDiffFluxPipeline cannot load"):
        SuperDiffFluxPipeline.from_pretrained(folder, local_files_only=True)
    loaded = SuperDiffQwenImagePipeline.from_pretrained(folder, local_files_only=True)
    shared = SuperDiffQwenImagePipeline.from_pipe(qwen)
    assert shared.transformer is qwen.transformer and shared.text_encoder is qwen.text_encoder
    kw = dict(num_inference_steps=2, output_type="np", **KW, **true_cfg(True))
    expected = shared(PROMPTS3[:2], generator=seeded(0), **kw).images
    np.testing.assert_array_equal(expected, loaded(PROMPTS3[:2], generator=seeded(0), **kw).images)
    np.testing.assert_array_equal(expected, compose(qwen, PROMPTS3[:2], generator=seeded(0), **kw).images)

    args = ["generate", "--model", str(folder), "--and", "a red circle", "--and", "a blue square", "--steps", "2",
            "--num-images", "2", "--height", "16", "--width", "16", "--dtype", "float32", "--quiet"]
    r = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "plain")])
    assert r.exit_code == 0, r.output
    plain = json.loads((tmp_path / "plain" / "image_001.json").read_text())
    assert plain["pipeline"] == "SuperDiffQwenImagePipeline" and plain["mode"] == "and" and plain["guidance"] is None
    r = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "cfg"), "--true-cfg-scale", "4",
                                        "--negative-prompt", NEGATIVE])
    assert r.exit_code == 0, r.output
    guided = json.loads((tmp_path / "cfg" / "image_001.json").read_text())
    assert guided["true_cfg_scale"] == TRUE_CFG and guided["kappa_trace"] != plain["kappa_trace"]

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded")

    SuperDiffQwenImagePipeline.from_pretrained = no_loading
    try:
        r = CliRunner().invoke(cli, args[:-7] + ["--height", "18", "--out", str(tmp_path / "no")])
        assert r.exit_code == 2 and "--height 18 is not a multiple of 4" in r.output and "--height 16" in r.output
        r = CliRunner().invoke(cli, args + ["--guidance", "3", "--out", str(tmp_path / "no")])
        assert r.exit_code == 2 and "--guidance does not apply" in r.output, r.output
    finally:
        del SuperDiffQwenImagePipeline.from_pretrained


def test_expressions_and_particles_on_qwenimage(tmp_path):
    """An And of two leaves is mode="and" to the bit; a product (degree 2) is refused unguided and sampled with
    true CFG; a corrected soft-min on particles returns one image per prompt set with finite weights, and image k
    of a list of generators is the single-image call with the list [generator k], particles and all."""
    pipe, _ = qwen_pipes(tmp_path)
    common = dict(KW, num_inference_steps=STEPS, output_type="latent")
    flat = pipe(prompts=PROMPTS3[:2], mode="and", generator=seeded(3), **common)
    tree = pipe(expression=f'"{PROMPTS3[0]}" & "{PROMPTS3[1]}"', generator=seeded(3), **common)
    assert torch.equal(flat.images, tree.images) and torch.equal(flat.kappa_trace, tree.kappa_trace)
    product = f'"{PROMPTS3[0]}" * "{PROMPTS3[1]}"'
    with pytest.raises(ValueError, match="has degree 2: .*pass a negative_prompt"):
        pipe(expression=product, **common)
    assert torch.isfinite(pipe(expression=product, generator=seeded(3), **common, **true_cfg(True)).images).all()
    text = f'softmin("{PROMPTS3[0]}", "{PROMPTS3[1]}")[sharpness=4]'  # degree 1, corrected: weighted particles
    gens = [seeded(5), seeded(6)]
    both = pipe(expression=text, particles=3, num_images_per_prompt=2, generator=gens, **common)
    assert both.images.shape[0] == 2 and torch.isfinite(both.images).all()
    assert torch.isfinite(both.log_weights).all() and (both.log_weights <= 1e-9).all()
    second = pipe(expression=text, particles=3, generator=[seeded(6)], **common)
    assert torch.allclose(both.images[1], second.images[0], atol=1e-5)
