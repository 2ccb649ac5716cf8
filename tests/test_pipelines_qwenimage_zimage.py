"""SuperDiffQwenImagePipeline (Qwen-Image: packed latents, Qwen2.5-VL text with Qwen-Image's prompt template, true
CFG with a negative prompt) and SuperDiffZImagePipeline (Z-Image: Qwen3 text with a chat template, a list-taking
transformer predicting x₀ − ε at timestep 1 − σ, guidance pos + g(pos − neg); Z-Image-Turbo unguided) on tiny
seeded models (CPU, offline). Each test runs on both families, described once in ``FAMILIES``:

* κ and log-density traces against the independent loop of pipeline_reference.py, which encodes each text
  alone with diffusers' own ``encode_prompt`` (no padding, no mask) and calls the transformer once per text,
  as diffusers' pipeline calls it, on diffusers' own σ grid and starting noise;
* one batched transformer call per step and one text-encoder call per call, prompts of different lengths;
* no NaN from σ = 1, and the guidance rule of each diffusers pipeline; sizes; bad arguments before any
  network call; loading, from_pipe, compose and `superdiff generate --model <saved folder>`; expressions and
  particles."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

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

PROMPTS3 = ["a red circle", "a small blue square on the left", "a green cross"]  # 3, 7 and 3 tokens: padded rows
NEGATIVE = "a cat"
SIZE = 16  # pixels: VAE factor 2 → 8×8 latents of 4 channels in 2×2 patches (Qwen-Image packs them: 16 × 16)


def qwen_reference(ours, qwen, texts, sigmas, size=8):
    """Qwen-Image as QwenImagePipeline runs it: each text encoded alone, the transformer at σ, x̂₀ = x − σu;
    the starting noise (B, 1, C, h, w) packed 2×2. Returns (x0(x, step, k), starting noise of 2 images)."""
    conds = [qwen.encode_prompt(t, device="cpu", max_sequence_length=16) for t in texts]
    assert all(mask is None for _, mask in conds) and len({e.shape[1] for e, _ in conds}) > 1

    def x0(x, i, k):
        b = x.shape[0]
        u = ours.transformer(hidden_states=x, timestep=torch.full((b,), sigmas[i], dtype=torch.float64),
                             encoder_hidden_states=conds[k][0].expand(b, -1, -1),
                             img_shapes=[[(1, size // 2, size // 2)]] * b, return_dict=False)[0]
        return x - sigmas[i] * u

    noise = torch.randn(2, 1, 4, size, size, generator=seeded(6))
    return x0, type(qwen)._pack_latents(noise, 2, 4, size, size).double()


def z_reference(ours, z, texts, sigmas, size=8):
    """Z-Image as ZImagePipeline runs it: each text encoded alone, a list of latents (C, 1, h, w) and of
    captions, timestep 1 − σ (ZImagePipeline's (1000 − t)/1000 before float32 rounding), velocity = −output;
    starting noise (B, C, h, w)."""
    conds = [z.encode_prompt(t, device="cpu", do_classifier_free_guidance=False, max_sequence_length=32)[0][0]
             for t in texts]
    assert len({c.shape[0] for c in conds}) > 1

    def x0(x, i, k):
        b = x.shape[0]
        t = torch.full((b,), 1 - sigmas[i], dtype=torch.float32)
        out = ours.transformer(list(x.unsqueeze(2).unbind(0)), t, [conds[k]] * b, return_dict=False)[0]
        return x + sigmas[i] * torch.stack(out).squeeze(2)

    return x0, torch.randn(2, 4, size, size, generator=seeded(6)).double()


@dataclass
class Family:
    """What differs between the two families in these tests: their components and diffusers pipeline, the
    arguments that guide them (and the sampler's weight then) or not, diffusers' σ grid helpers, the
    independent reference, the latents' shape, and the CLI flags that guide."""

    name: str
    adapter: str
    diffusers: str
    components: str
    guided: dict
    unguided: dict
    weight: float
    grid_module: str
    reference: Callable[..., Any]
    latent_shape: tuple[int, ...]  # of 3 images of SIZE² pixels, output_type="latent"
    cli_guided: list[str]
    max_sequence_length: int

    def pipes(self, tmp_path):
        import diffusers

        import superdiff.pipelines
        import superdiff.testing

        comps = getattr(superdiff.testing, self.components)(tokenizer_dir=tmp_path / f"{self.name}-tokenizer")
        return getattr(superdiff.pipelines, self.adapter)(**comps), getattr(diffusers, self.diffusers)(**comps)

    def sigmas(self, scheduler) -> list[float]:
        """diffusers' own σ grid of STEPS steps at 16 image tokens: its helpers, as its pipeline calls them."""
        import importlib

        module = importlib.import_module(self.grid_module)
        config = scheduler.config
        mu = module.calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                                    config.max_shift)
        grid = (module.get_default_z_image_sigmas(STEPS) if hasattr(module, "get_default_z_image_sigmas")
                else np.linspace(1.0, 1 / STEPS, STEPS))
        module.retrieve_timesteps(scheduler, STEPS, "cpu", sigmas=grid, mu=mu)
        return [float(s) for s in scheduler.sigmas.double()]

    def kw(self, **extra) -> dict:
        return dict(height=SIZE, width=SIZE, max_sequence_length=self.max_sequence_length, progress=False) | extra


QWEN = Family(
    "qwenimage", "SuperDiffQwenImagePipeline", "QwenImagePipeline", "tiny_qwenimage_components",
    guided=dict(true_cfg_scale=4.0, negative_prompt=NEGATIVE), unguided=dict(true_cfg_scale=1.0), weight=4.0,
    grid_module="diffusers.pipelines.qwenimage.pipeline_qwenimage", reference=qwen_reference,
    latent_shape=(3, 16, 16), cli_guided=["--true-cfg-scale", "4", "--negative-prompt", NEGATIVE],
    max_sequence_length=16,
)
ZIMAGE = Family(
    "zimage", "SuperDiffZImagePipeline", "ZImagePipeline", "tiny_zimage_components",
    guided=dict(guidance_scale=3.0, negative_prompt=NEGATIVE), unguided=dict(guidance_scale=0.0), weight=4.0,
    grid_module="diffusers.pipelines.z_image.pipeline_z_image", reference=z_reference,
    latent_shape=(3, 4, 8, 8), cli_guided=["--guidance", "3", "--negative-prompt", NEGATIVE],
    max_sequence_length=32,
)
FAMILIES = [QWEN, ZIMAGE]
both = pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)


def guidance(family: Family, on: bool) -> dict:
    return family.guided if on else family.unguided


@both
@pytest.mark.parametrize("mode, cfg, m", [
    ("and", False, 2), ("or", False, 2), ("and", True, 2), ("or", True, 2), ("and", False, 3), ("or", True, 3),
])
def test_traces_match_independent_loop(family, mode, cfg, m, tmp_path):
    ours, theirs = family.pipes(tmp_path)
    ours.to(torch.float64)  # the shared modules: theirs too
    prompts = PROMPTS3[:m]
    out, states = run_with_states(ours, prompts, mode=mode, num_inference_steps=STEPS, num_images_per_prompt=2,
                                  generator=seeded(6), output_type="latent", **family.kw(**guidance(family, cfg)))
    sigmas = family.sigmas(theirs.scheduler)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == STEPS + 1
    torch.testing.assert_close(out.timesteps, torch.tensor(sigmas[:-1], dtype=torch.float64) * 1000)
    grid = [(1.0 - s, s) for s in sigmas]  # x_t = (1 − t) x₀ + t ε, t = σ
    with torch.no_grad():
        x0, start = family.reference(ours, theirs, prompts + [NEGATIVE], sigmas)  # k = m: the negative prompt
        g = seeded(6)
        torch.randn(start.shape, generator=g)  # the generator past the starting noise, as the pipeline's
        ref = reference_loop(PerConditionDenoiser(x0, m), grid, start, g, mode, family.weight if cfg else None,
                             states=states)
    assert out.kappa_trace.shape == (STEPS, 2, m)
    assert_traces_match(out, *ref, out.images, rtol=1e-8)


def rows_of(args, kwargs) -> int:
    x = kwargs.get("hidden_states", args[0] if args else None)
    return x.shape[0] if isinstance(x, torch.Tensor) else len(x)  # Z-Image's transformer takes a list


@both
@pytest.mark.parametrize("cfg", [False, True])
def test_one_batched_transformer_call_per_step_and_one_text_encoding(family, cfg, tmp_path):
    ours, _ = family.pipes(tmp_path)
    rows = []
    ours.transformer.register_forward_pre_hook(lambda mod, args, kwargs: rows.append(rows_of(args, kwargs)),
                                               with_kwargs=True)
    encodings = count_calls(ours.text_encoder)
    out = ours(PROMPTS3[:2], num_inference_steps=STEPS, num_images_per_prompt=3, output_type="latent",
               generator=seeded(1), **family.kw(**guidance(family, cfg)))
    assert rows == [(2 + cfg) * 3] * STEPS  # all prompts (and the negative one) of a step in one call
    given = guidance(family, cfg)  # the rule the command line counts rows by, before loading
    assert type(ours).guides(given.get("guidance_scale"), given.get("true_cfg_scale"),
                             negative_prompt=given.get("negative_prompt"), config=ours.config) == cfg
    assert len(encodings) == 1  # every text of the call in one text-encoder call
    assert out.images.shape == family.latent_shape  # diffusers' latents (Qwen-Image's packed)


def test_z_image_guides_for_any_guidance_above_zero(tmp_path):
    """ZImagePipeline's guidance g > 0 adds the negative prompt's row even at g ≤ 1 (weight 1 + g), unlike the
    families that guide above 1; its ``guides`` says so, and the command line counts rows by it."""
    ours, _ = ZIMAGE.pipes(tmp_path)
    rows = []
    ours.transformer.register_forward_pre_hook(lambda mod, args, kwargs: rows.append(rows_of(args, kwargs)),
                                               with_kwargs=True)
    ours(PROMPTS3[:2], num_inference_steps=STEPS, output_type="latent", generator=seeded(1),
         **ZIMAGE.kw(guidance_scale=0.5))
    assert rows == [3] * STEPS and type(ours).guides(0.5, None) and not type(ours).guides(0.0, None)


@both
def test_no_nan_from_sigma_one_and_the_guidance_rule(family, tmp_path):
    """From σ = 1 (α = 0) every mode stays finite, guided and not. Unguided calls evaluate no unconditional row
    and are the same call bit for bit: Qwen-Image's true_cfg_scale ≤ 1, or its default 4 without a negative
    prompt (QwenImagePipeline's rule), with any guidance_scale (ignored, as there); Z-Image's guidance_scale 0.
    Any Z-Image g > 0 guides (ZImagePipeline's rule). Decoded images come from each family's VAE."""
    ours, _ = family.pipes(tmp_path)
    kw = family.kw(num_inference_steps=3, num_images_per_prompt=2, output_type="np")
    for mode, cfg in [("and", False), ("or", False), ("average", False), ("sum", True), ("and", True)]:
        out = ours(PROMPTS3[:2], mode=mode, generator=seeded(0), **kw, **guidance(family, cfg))
        assert float(out.timesteps[0]) == 1000.0  # σ = 1, α = 0
        assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all()
        assert torch.isfinite(out.log_density_trace).all() and torch.isfinite(out.kappa_trace).all()
    rows = []
    ours.transformer.register_forward_pre_hook(lambda mod, args, kwargs: rows.append(rows_of(args, kwargs)),
                                               with_kwargs=True)
    unguided = [family.unguided] + ([dict(true_cfg_scale=0.5), {}, dict(guidance_scale=7.5)] if family is QWEN else [])
    plain = [ours(PROMPTS3[:2], generator=seeded(0), **kw, **args).images for args in unguided]
    assert all(np.array_equal(plain[0], other) for other in plain[1:]) and rows == [4] * 3 * len(unguided)
    weak = dict(guidance_scale=0.5) if family is ZIMAGE else family.guided
    assert not np.array_equal(plain[0], ours(PROMPTS3[:2], generator=seeded(0), **kw, **weak).images)
    assert rows[-3:] == [6] * 3
    assert (ours.true_cfg_scale if family is QWEN else ours.guidance_scale) == (4.0 if family is QWEN else 0.5)


@both
def test_sizes_as_diffusers_takes_them(family, tmp_path):
    """Multiples of 2 × the VAE factor (non-square too) are sampled, as diffusers requires; others are refused
    before any network call, naming a size to use."""
    ours, _ = family.pipes(tmp_path)
    calls = count_calls(ours.transformer)
    for side, use in ((18, 16), (6, 4), (3, 4)):
        with pytest.raises(ValueError, match=rf"^height={side} is not valid: must be a positive multiple of 4.*e\.g\. "
                                             rf"{use}$"):
            ours(PROMPTS3[:2], **family.kw(height=side))
    assert calls == []
    kw = family.kw(num_inference_steps=2, num_images_per_prompt=2, height=8, width=24, **family.unguided)
    latents = ours(PROMPTS3[:2], output_type="latent", **kw).images
    assert latents.shape == ((2, 2 * 6, 16) if family is QWEN else (2, 4, 4, 12))
    assert ours(PROMPTS3[:2], **kw).images[0].size == (24, 8)


@pytest.mark.parametrize("family, bad, argument", [
    (QWEN, dict(negative_prompt=NEGATIVE, true_cfg_scale=1.0), "negative_prompt"),  # true CFG off
    (QWEN, dict(true_cfg_scale=-1.0, negative_prompt=NEGATIVE), "true_cfg_scale"),
    (QWEN, dict(true_cfg_scale=float("nan"), negative_prompt=NEGATIVE), "true_cfg_scale"),
    (QWEN, dict(guidance_scale=-3.5), "guidance_scale"),  # ignored (no distilled guidance input), but a number
    (QWEN, dict(max_sequence_length=1025), "max_sequence_length"),
    (QWEN, dict(latents=torch.zeros(1, 4, 8, 8)), "latents"),  # not packed
    (ZIMAGE, dict(negative_prompt=NEGATIVE, guidance_scale=0.0), "negative_prompt"),  # guidance off
    (ZIMAGE, dict(guidance_scale=-1.0), "guidance_scale"),
    (ZIMAGE, dict(guidance_scale=None), "guidance_scale"),
    (ZIMAGE, dict(guidance_scale=float("inf")), "guidance_scale"),
    (ZIMAGE, dict(max_sequence_length=513), "max_sequence_length"),
    # unguided weights that do not sum to 1 at σ = 1: named by the composition
    *[(f, dict(mode="sum", **f.unguided), r"the combiner's weights \(1.0, 1.0\) sum to 2: without guidance")
      for f in FAMILIES],
    *[(f, dict(width=10), "width") for f in FAMILIES],
    *[(f, dict(prompt_embeds=torch.zeros(1, 8, 16)), "prompt_embeds") for f in FAMILIES],
], ids=lambda v: v.name if isinstance(v, Family) else None)
def test_bad_arguments_are_refused_before_any_network_call(family, bad, argument, tmp_path):
    ours, _ = family.pipes(tmp_path)
    calls = [count_calls(n) for n in (ours.transformer, ours.text_encoder)]
    with pytest.raises(ValueError, match=f"^{argument}" + ("" if argument.startswith("the ") else "=")):
        ours(PROMPTS3[:2], **family.kw(**bad))
    assert all(c == [] for c in calls)
    if family is ZIMAGE:  # diffusers' cfg_normalization: refused by name, not silently ignored
        with pytest.raises(TypeError, match="'cfg_normalization' is not a sampling option"):
            ours(PROMPTS3[:2], cfg_normalization=True, **family.kw())


@both
def test_loading_from_pipe_compose_and_generate_on_a_saved_folder(family, tmp_path):
    """A saved diffusers folder is read as its family (pipeline_class_for, from_pretrained with local_files_only;
    another family's class refuses it before reading weights); from_pipe shares the modules and samples what
    the loaded pipeline samples, as compose(diffusers_pipe, ...) does; `superdiff generate --model <folder>`
    composes on it with the family's default guidance, and guided by the family's flags, its sidecar naming
    the adapter; a size that is not a multiple of 4 and the other family's guidance flag are refused before the
    weights load."""
    from click.testing import CliRunner

    import superdiff.pipelines as pipelines
    from superdiff_cli.main import cli

    adapter = getattr(pipelines, family.adapter)
    _, theirs = family.pipes(tmp_path)
    folder = tmp_path / family.name
    theirs.save_pretrained(folder)
    assert pipelines.pipeline_class_for(folder) is adapter
    other = pipelines.SuperDiffFluxPipeline if family is QWEN else pipelines.SuperDiffPipeline
    with pytest.raises(ValueError, match=f"is a {family.diffusers} .*{other.__name__} cannot load"):
        other.from_pretrained(folder, local_files_only=True)
    loaded = adapter.from_pretrained(folder, local_files_only=True)
    shared = adapter.from_pipe(theirs)
    assert shared.transformer is theirs.transformer and shared.text_encoder is theirs.text_encoder
    kw = family.kw(num_inference_steps=2, output_type="np", **family.guided)
    expected = shared(PROMPTS3[:2], generator=seeded(0), **kw).images
    np.testing.assert_array_equal(expected, loaded(PROMPTS3[:2], generator=seeded(0), **kw).images)
    np.testing.assert_array_equal(expected, pipelines.compose(theirs, PROMPTS3[:2], generator=seeded(0), **kw).images)

    args = ["generate", "--model", str(folder), "--and", "a red circle", "--and", "a blue square", "--steps", "2",
            "--num-images", "2", "--height", "16", "--width", "16", "--dtype", "float32", "--quiet"]
    r = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "default")])
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "default" / "image_001.json").read_text())
    assert side["pipeline"] == family.adapter and side["mode"] == "and"
    assert side["guidance"] == (None if family is QWEN else 5.0)  # QwenImagePipeline's none, ZImagePipeline's 5
    r = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "guided")] + family.cli_guided)
    assert r.exit_code == 0, r.output
    guided = json.loads((tmp_path / "guided" / "image_001.json").read_text())
    assert guided["negative_prompt"] == NEGATIVE and guided["kappa_trace"] != side["kappa_trace"]

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded")

    adapter.from_pretrained = no_loading
    try:
        r = CliRunner().invoke(cli, args[:-7] + ["--height", "18", "--out", str(tmp_path / "no")])
        assert r.exit_code == 2 and "--height 18 is not a multiple of 4" in r.output and "--height 16" in r.output
        wrong = ["--guidance", "3"] if family is QWEN else ["--true-cfg-scale", "4"]
        r = CliRunner().invoke(cli, args + wrong + ["--out", str(tmp_path / "no")])
        message = "--guidance does not apply" if family is QWEN else "--true-cfg-scale applies to FLUX.1 and Qwen"
        assert r.exit_code == 2 and message in r.output, r.output
    finally:
        del adapter.from_pretrained


@both
def test_expressions_and_particles(family, tmp_path):
    """An And of two leaves is mode="and" to the bit; a product (degree 2) is refused unguided, naming how this
    family guides, and sampled guided; a corrected soft-min on particles returns one image per prompt set with
    finite weights, and image k of a list of generators is the single-image call with the list [generator k],
    particles and all."""
    pipe, _ = family.pipes(tmp_path)
    common = family.kw(num_inference_steps=STEPS, output_type="latent", **family.unguided)
    flat = pipe(prompts=PROMPTS3[:2], mode="and", generator=seeded(3), **common)
    tree = pipe(expression=f'"{PROMPTS3[0]}" & "{PROMPTS3[1]}"', generator=seeded(3), **common)
    assert torch.equal(flat.images, tree.images) and torch.equal(flat.kappa_trace, tree.kappa_trace)
    product = f'"{PROMPTS3[0]}" * "{PROMPTS3[1]}"'
    fix = "pass a negative_prompt" if family is QWEN else r"guidance_scale above 0 \(e.g. 5.0; it is 0.0\)"
    with pytest.raises(ValueError, match=f"has degree 2: .*{fix}"):
        pipe(expression=product, **common)
    guided = common | family.guided
    assert torch.isfinite(pipe(expression=product, generator=seeded(3), **guided).images).all()
    text = f'softmin("{PROMPTS3[0]}", "{PROMPTS3[1]}")[sharpness=4]'  # degree 1, corrected: weighted particles
    both_images = pipe(expression=text, particles=3, num_images_per_prompt=2, generator=[seeded(5), seeded(6)],
                       **common)
    assert both_images.images.shape[0] == 2 and torch.isfinite(both_images.images).all()
    assert torch.isfinite(both_images.log_weights).all() and (both_images.log_weights <= 1e-9).all()
    second = pipe(expression=text, particles=3, generator=[seeded(6)], **common)
    assert torch.allclose(both_images.images[1], second.images[0], atol=1e-5)
