"""SuperDiff in Modular Diffusers pipelines (superdiff.pipelines.modular) on tiny seeded components (CPU,
offline): with the same components and seeds, the modular SDXL, SD3, FLUX.1, FLUX.2 (dev, klein), Qwen-Image
(unguided: its guided denoise step is refused) and Z-Image pipelines with the SuperDiff steps swapped in give the
non-modular superdiff pipeline's latents and traces (the prompts encoded by the modular pipeline's own text blocks,
the latents decoded by its own decode step); one network call per step; bad arguments refused before the text
encoders run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_reference import PROMPTS, STEPS, count_calls, seeded

#: float64 components: the modular text blocks encode the M prompts without the unconditional row, the
#: superdiff pipeline with it, so batched matmuls may round differently; the traces agree to this.
RTOL = 1e-10
EXPRESSION = '"a red circle" | "a blue square"'


def _modular(blocks_class: str, components: dict):
    import diffusers.modular_pipelines as modular

    from superdiff.pipelines.modular import superdiff_blocks

    pipe = superdiff_blocks(getattr(modular, blocks_class)()).init_pipeline()
    pipe.update_components(**components)
    return pipe


def sdxl(tmp_path, guidance: float | None):
    """The non-modular SuperDiffXLPipeline and the modular SDXL pipeline on the same float64 components; the
    guider carries the guidance scale (disabled: unguided, as guidance_scale=None)."""
    from diffusers.guiders import ClassifierFreeGuidance

    from superdiff.pipelines import SuperDiffXLPipeline
    from superdiff.testing import tiny_sdxl_components

    ours = SuperDiffXLPipeline(**tiny_sdxl_components(tokenizer_dir=tmp_path)).to(torch.float64)
    components = {k: v for k, v in ours.components.items() if k != "force_zeros_for_empty_prompt"}
    guider = ClassifierFreeGuidance(guidance_scale=guidance or 7.5, enabled=guidance is not None)
    return ours, _modular("StableDiffusionXLAutoBlocks", {**components, "guider": guider})


def sd3(tmp_path, guidance: float | None):
    from diffusers.guiders import ClassifierFreeGuidance

    from superdiff.pipelines import SuperDiffFlowPipeline
    from superdiff.testing import tiny_sd3_components

    ours = SuperDiffFlowPipeline(**tiny_sd3_components(tokenizer_dir=tmp_path, t5=True)).to(torch.float64)
    guider = ClassifierFreeGuidance(guidance_scale=guidance or 7.0, enabled=guidance is not None)
    return ours, _modular("StableDiffusion3AutoBlocks", {**ours.components, "guider": guider})


def flux(tmp_path):
    from superdiff.pipelines import SuperDiffFluxPipeline
    from test_pipelines_flux import tiny_flux_components

    ours = SuperDiffFluxPipeline(**tiny_flux_components(tmp_path)).to(torch.float64)
    return ours, _modular("FluxAutoBlocks", dict(ours.components))


def flux2(tmp_path=None):
    """FLUX.2 dev (guidance-distilled). Its modular text step prompts Mistral-3 with another system message than
    Flux2Pipeline's, so the superdiff pipeline is given that one: the same text encoding, then the same run."""
    from diffusers.modular_pipelines.flux2.encoders import Flux2TextEncoderStep

    from superdiff.pipelines import SuperDiffFlux2Pipeline
    from superdiff.testing import tiny_flux2_components

    ours = SuperDiffFlux2Pipeline(**tiny_flux2_components()).to(torch.float64)
    ours.embed_options = {"system_message": Flux2TextEncoderStep.DEFAULT_SYSTEM_MESSAGE}
    return ours, _modular("Flux2AutoBlocks", dict(ours.components))


def assert_same_run(out, state, latents=None):
    """The modular run's SuperDiff output equals the non-modular pipeline's ``out``."""
    modular = state.get("superdiff_output")
    scale = 1.0 + float(out.log_density_trace.abs().max())
    torch.testing.assert_close(modular.log_density_trace, out.log_density_trace, rtol=0, atol=RTOL * scale)
    torch.testing.assert_close(modular.kappa_trace, out.kappa_trace, rtol=0, atol=RTOL)
    if isinstance(out.images, torch.Tensor):  # output_type="latent"
        atol = RTOL * (1 + float(out.images.abs().max()))
        torch.testing.assert_close(modular.images, out.images, rtol=0, atol=atol)
    torch.testing.assert_close(modular.timesteps, out.timesteps, rtol=0, atol=0)
    if latents is not None:  # what the pipeline's decode step received
        torch.testing.assert_close(state.get("latents"), latents, rtol=0, atol=RTOL * (1 + float(latents.abs().max())))


COMPOSITIONS = [dict(mode="and"), dict(mode="or"), dict(mode="or", temperature=2.0, log_weights=[0.0, 0.5])]


@pytest.mark.parametrize("composition", COMPOSITIONS + [dict(expression=EXPRESSION)], ids=str)
@pytest.mark.parametrize("guidance", [5.0, None])
def test_sdxl_modular_equals_the_superdiff_pipeline(composition, guidance, tmp_path):
    ours, pipe = sdxl(tmp_path, guidance)
    prompts = {} if "expression" in composition else {"prompts": PROMPTS}
    kw = dict(num_inference_steps=STEPS, num_images_per_prompt=2, output_type="latent", progress=False)
    out = ours(**prompts, **composition, guidance_scale=guidance, generator=seeded(4), **kw)
    calls, encoder_calls = count_calls(ours.unet), count_calls(ours.text_encoder_2)
    state = pipe(prompt=prompts.get("prompts"), **composition, generator=seeded(4), **kw)
    assert state.get("prompt_embeds").shape[0] == 2  # the modular text encoder encoded the two prompts,
    assert len(encoder_calls) == 1  # and the denoise step used its embeddings, not encoding them again
    assert len(calls) == STEPS  # one UNet call per step, all prompts (and the unconditional row) batched
    assert_same_run(out, state, out.images)
    assert state.get("images").shape == (2, 4, 8, 8)


@pytest.mark.parametrize("composition", COMPOSITIONS[:2] + [dict(expression=EXPRESSION)], ids=str)
@pytest.mark.parametrize("guidance", [5.0, None])
def test_sd3_modular_equals_the_superdiff_pipeline(composition, guidance, tmp_path):
    """SD3's modular text encoder makes the unconditional row only from a negative prompt: the input step
    passes "" under guidance, the text the superdiff pipeline encodes for it."""
    ours, pipe = sd3(tmp_path, guidance)
    prompts = {} if "expression" in composition else {"prompts": PROMPTS}
    kw = dict(num_inference_steps=STEPS, num_images_per_prompt=2, max_sequence_length=8, output_type="latent",
              progress=False)
    out = ours(**prompts, **composition, guidance_scale=guidance, generator=seeded(3), **kw)
    calls = count_calls(ours.transformer)
    state = pipe(prompt=prompts.get("prompts"), **composition, generator=seeded(3), **kw)
    assert len(calls) == STEPS
    assert (state.get("negative_prompt_embeds") is None) == (guidance is None)
    assert_same_run(out, state, out.images)


def test_sdxl_modular_decodes_with_its_own_step_and_takes_the_sampling_options(tmp_path):
    """Images decoded by the modular pipeline's decode step equal the superdiff pipeline's; an expression that
    corrects runs with weighted particles, a non-default sampling option and a negative prompt (as a
    one-element list, which the modular text encoder takes as a string) through the modular call."""
    ours, pipe = sdxl(tmp_path, 4.0)
    kw = dict(num_inference_steps=STEPS, output_type="np", progress=False)
    options = dict(expression='"a red circle" * "a blue square"', particles=2, density_variance="forward",
                   negative_prompt=["a cat"])
    out = ours(guidance_scale=4.0, generator=seeded(2), **options, **kw)
    state = pipe(generator=seeded(2), **options, **kw)
    np.testing.assert_allclose(state.get("images"), out.images, rtol=0, atol=1e-6)  # float32 images
    assert_same_run(out, state)
    assert state.get("superdiff_output").log_weights is not None


@pytest.mark.parametrize("composition", COMPOSITIONS[:2] + [dict(expression=EXPRESSION)], ids=str)
def test_flux_modular_equals_the_superdiff_pipeline(composition, tmp_path):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    ours, pipe = flux(tmp_path)
    prompts = {} if "expression" in composition else {"prompts": PROMPTS}
    kw = dict(num_inference_steps=STEPS, num_images_per_prompt=2, height=16, width=16, guidance_scale=2.5,
              progress=False)
    out = ours(**prompts, **composition, max_sequence_length=8, output_type="latent", generator=seeded(6), **kw)
    rows = []
    ours.transformer.register_forward_pre_hook(lambda m, a, k: rows.append(a[0].shape[0]),
                                               with_kwargs=True)
    state = pipe(prompt=prompts.get("prompts"), **composition, max_sequence_length=8, output_type="latent",
                 generator=seeded(6), **kw)
    assert rows == [2 * 2] * STEPS  # one transformer call per step on M·B rows
    unpacked = FluxPipeline._unpack_latents(out.images, 16, 16, ours.vae_scale_factor)
    assert_same_run(out, state, unpacked)  # the decode step received the unpacked latents


@pytest.mark.parametrize("bad, argument", [
    (dict(mode="xor"), "mode"),
    (dict(particles=0), "particles"),
    (dict(particles=2), "particles"),  # no Feynman–Kac weights to carry with a mode
    (dict(height=17), "height"),
    (dict(expression='"a" & "b"', prompt=PROMPTS), "expression"),
    (dict(image=torch.zeros(1, 3, 16, 16)), "image"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    (dict(guidance_scale=5.0), "guidance_scale"),  # the guider's, not an input diffusers would only warn about
    (dict(guider=dict(guidance_rescale=0.7)), "guider.guidance_rescale"),
    (dict(guider=dict(stop=0.5)), "guider.stop"),
])
def test_bad_arguments_are_refused_before_the_text_encoders_run(bad, argument, tmp_path):
    from diffusers.guiders import ClassifierFreeGuidance

    _, pipe = sdxl(tmp_path, 5.0)
    if "guider" in bad:
        pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=5.0, **bad.pop("guider")))
    calls = [count_calls(network) for network in (pipe.text_encoder, pipe.text_encoder_2, pipe.unet)]
    with pytest.raises(ValueError, match=rf"^{argument}="):
        pipe(**{"prompt": PROMPTS, **bad}, num_inference_steps=2, output_type="latent", progress=False)
    assert calls == [[], [], []]


@pytest.mark.parametrize("family", [flux, flux2], ids=["flux", "flux2"])
@pytest.mark.parametrize("bad, argument", [
    (dict(guidance_scale=-1.0), "guidance_scale"),  # the distilled guidance
    (dict(max_sequence_length=0), "max_sequence_length"),
    (dict(height=18), "height"),  # not a multiple of 2 × the VAE factor (the 2×2 packing)
    (dict(mode="sum"), "the combiner's weights"),  # no denoised form at σ = 1 without guidance
])
def test_flux_bad_arguments_are_refused_before_the_text_encoders_run(family, bad, argument, tmp_path):
    _, pipe = family(tmp_path)
    networks = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "transformer")]
    calls = [count_calls(network) for network in networks if network is not None]
    kw = dict(prompt=PROMPTS, height=16, width=16, max_sequence_length=8, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=rf"^{argument}"):
        pipe(**{**kw, **bad}, output_type="latent")
    assert calls == [[]] * len(calls)


def test_the_steps_refuse_what_they_cannot_compose(tmp_path):
    from diffusers.modular_pipelines import LTXAutoBlocks, StableDiffusionXLAutoBlocks

    from superdiff.pipelines.modular import SuperDiffDenoiseStep, superdiff_blocks

    with pytest.raises(ValueError, match="^model_name='ltx'"):
        superdiff_blocks(LTXAutoBlocks())
    blocks = StableDiffusionXLAutoBlocks()
    blocks.sub_blocks["denoise"] = SuperDiffDenoiseStep("stable-diffusion-xl")  # without the input step
    ours, _ = sdxl(tmp_path, None)
    pipe = blocks.init_pipeline()
    pipe.update_components(**{k: v for k, v in ours.components.items() if k != "force_zeros_for_empty_prompt"})
    with pytest.raises(ValueError, match="needs SuperDiffInputStep"):
        pipe(prompt=PROMPTS, num_inference_steps=2, output_type="latent")


def qwenimage(tmp_path):
    """Qwen-Image's modular pipeline with its guider disabled (its guided denoise step is refused)."""
    from diffusers.guiders import ClassifierFreeGuidance

    from superdiff.pipelines import SuperDiffQwenImagePipeline
    from superdiff.testing import tiny_qwenimage_components

    ours = SuperDiffQwenImagePipeline(**tiny_qwenimage_components(tokenizer_dir=tmp_path)).to(torch.float64)
    guider = ClassifierFreeGuidance(guidance_scale=4.0, enabled=False)
    return ours, _modular("QwenImageAutoBlocks", {**ours.components, "guider": guider})


def zimage(tmp_path, guidance: float | None):
    """Z-Image's modular pipeline: its guider's weight w is ZImagePipeline's guidance_scale g = w − 1."""
    from diffusers.guiders import ClassifierFreeGuidance

    from superdiff.pipelines import SuperDiffZImagePipeline
    from superdiff.testing import tiny_zimage_components

    ours = SuperDiffZImagePipeline(**tiny_zimage_components(tokenizer_dir=tmp_path)).to(torch.float64)
    guider = ClassifierFreeGuidance(guidance_scale=guidance or 5.0, enabled=guidance is not None)
    return ours, _modular("ZImageAutoBlocks", {**ours.components, "guider": guider})


QWEN_PROMPTS = ["a red circle", "a small blue square on the left"]  # rows of different lengths: padded, masked


@pytest.mark.parametrize("composition", COMPOSITIONS[:2] + [dict(expression=EXPRESSION)], ids=str)
def test_qwenimage_modular_equals_the_superdiff_pipeline(composition, tmp_path):
    """The modular text blocks encode the M prompts padded to their longest (the superdiff pipeline's rows, with
    the unconditional one, to theirs): the same rows to the transformer; its decode step decodes the unpacked latents
    to the superdiff pipeline's images."""
    ours, pipe = qwenimage(tmp_path)
    prompts = {} if "expression" in composition else {"prompts": QWEN_PROMPTS}
    kw = dict(num_inference_steps=STEPS, num_images_per_prompt=2, height=16, width=16, max_sequence_length=16,
              progress=False)
    out = ours(**prompts, **composition, true_cfg_scale=1.0, output_type="latent", generator=seeded(5), **kw)
    calls, encoder_calls = count_calls(ours.transformer), count_calls(ours.text_encoder)
    # the modular decode step takes no output_type="latent"; the superdiff output holds the latents
    state = pipe(prompt=prompts.get("prompts"), **composition, output_type="pt", generator=seeded(5), **kw)
    assert len(encoder_calls) == 1 and len(calls) == STEPS  # one text encoding, one transformer call per step
    assert state.get("negative_prompt_embeds") is None
    assert_same_run(out, state)
    images = ours(**prompts, **composition, true_cfg_scale=1.0, output_type="pt", generator=seeded(5), **kw).images
    torch.testing.assert_close(state.get("images").float(), images, rtol=0, atol=1e-6)  # float32 images, decoded
    # from the unpacked latents


@pytest.mark.parametrize("composition", COMPOSITIONS[:2] + [dict(expression=EXPRESSION)], ids=str)
@pytest.mark.parametrize("guidance", [4.0, None])
def test_zimage_modular_equals_the_superdiff_pipeline(composition, guidance, tmp_path):
    """The modular text blocks encode a list of caption features of their own lengths (and the negative "" once
    per prompt under guidance); the guider's w is ZImagePipeline's g = w − 1."""
    ours, pipe = zimage(tmp_path, guidance)
    prompts = {} if "expression" in composition else {"prompts": QWEN_PROMPTS}
    kw = dict(num_inference_steps=STEPS, num_images_per_prompt=2, height=16, width=16, max_sequence_length=32,
              output_type="latent", progress=False)
    g = 0.0 if guidance is None else guidance - 1.0
    out = ours(**prompts, **composition, guidance_scale=g, generator=seeded(7), **kw)
    rows = []
    ours.transformer.register_forward_pre_hook(lambda m, a, k: rows.append(len(a[0])), with_kwargs=True)
    state = pipe(prompt=prompts.get("prompts"), **composition, generator=seeded(7), **kw)
    assert rows == [2 * (2 + (guidance is not None))] * STEPS  # one transformer call per step on all rows
    assert (state.get("negative_prompt_embeds") is None) == (guidance is None)
    assert_same_run(out, state, out.images)
    assert state.get("images") is not None


@pytest.mark.parametrize("family", ["qwenimage", "zimage"])
@pytest.mark.parametrize("bad, argument", [
    (dict(mode="xor"), "mode"),
    (dict(height=18), "height"),  # not a multiple of 2 × the VAE factor (the 2×2 patches)
    (dict(image=torch.zeros(1, 3, 16, 16)), "image"),
    (dict(negative_prompt="a cat"), "negative_prompt"),  # the guider is disabled: no unconditional branch
    (dict(guidance_scale=5.0), "guidance_scale"),  # the guider's
    (dict(guider=dict(guidance_scale=4.0, stop=0.5)), "guider.stop"),
])
def test_qwenimage_zimage_bad_arguments_are_refused_before_the_text_encoders_run(family, bad, argument, tmp_path):
    from diffusers.guiders import ClassifierFreeGuidance

    _, pipe = qwenimage(tmp_path) if family == "qwenimage" else zimage(tmp_path, None)
    bad = dict(bad)  # shared by both families' runs
    if "guider" in bad:
        pipe.update_components(guider=ClassifierFreeGuidance(**bad.pop("guider")))
    calls = [count_calls(network) for network in (pipe.text_encoder, pipe.transformer)]
    kw = dict(prompt=PROMPTS, height=16, width=16, max_sequence_length=16, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=rf"^{argument}"):
        pipe(**{**kw, **bad}, output_type="pt")
    assert calls == [[], []]


def test_qwenimage_guided_modular_denoise_is_refused(tmp_path):
    """Qwen-Image's modular denoise step rescales the guided velocity to each token's conditional norm, which the
    SuperDiff step (affine in κ) cannot express: an enabled guider is refused, naming the reason."""
    from diffusers.guiders import ClassifierFreeGuidance

    _, pipe = qwenimage(tmp_path)
    pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=4.0))
    calls = [count_calls(network) for network in (pipe.text_encoder, pipe.transformer)]
    with pytest.raises(ValueError, match=r"^guider=.*conditional norm.*enabled=False"):
        pipe(prompt=PROMPTS, height=16, width=16, num_inference_steps=2, output_type="pt", progress=False)
    assert calls == [[], []]


@pytest.mark.parametrize("composition", COMPOSITIONS[:2] + [dict(expression=EXPRESSION)], ids=str)
def test_flux2_modular_equals_the_superdiff_pipeline(composition):
    """FLUX.2 dev: the distilled guidance is the guidance_scale input; the decode step gets the patchified latents
    (the superdiff pipeline's packed tokens unpacked) and decodes them to its images."""
    ours, pipe = flux2()
    prompts = {} if "expression" in composition else {"prompts": PROMPTS}
    kw = dict(num_inference_steps=STEPS, num_images_per_prompt=2, height=16, width=16, guidance_scale=2.5,
              max_sequence_length=32, progress=False)
    out = ours(**prompts, **composition, output_type="latent", generator=seeded(6), **kw)
    rows = []
    ours.transformer.register_forward_pre_hook(lambda m, a, k: rows.append(a[0].shape[0]),
                                               with_kwargs=True)
    state = pipe(prompt=prompts.get("prompts"), **composition, output_type="pt", generator=seeded(6), **kw)
    assert rows == [2 * 2] * STEPS  # one transformer call per step on M·B rows
    patchified = out.images.transpose(1, 2).reshape(2, 16, 4, 4)  # the inverse of Flux2Pipeline._pack_latents
    assert_same_run(out, state, patchified)  # the decode step received the patchified latents
    images = ours(**prompts, **composition, output_type="pt", generator=seeded(6), **kw).images
    torch.testing.assert_close(state.get("images").float(), images, rtol=0, atol=1e-6)  # float32 images


def klein(blocks: str, guidance: float | None, distilled: bool):
    """FLUX.2 klein: step-distilled (Flux2KleinAutoBlocks, no guider) or base (Flux2KleinBaseAutoBlocks, whose
    guider guides with the empty prompt); the pipeline's is_distilled config reaches the superdiff adapter."""
    from diffusers.guiders import ClassifierFreeGuidance

    from superdiff.pipelines import SuperDiffFlux2KleinPipeline
    from superdiff.testing import tiny_flux2_components

    ours = SuperDiffFlux2KleinPipeline(**tiny_flux2_components(klein=True), is_distilled=distilled).to(torch.float64)
    components = {name: ours.components[name] for name in ("scheduler", "vae", "text_encoder", "tokenizer",
                                                             "transformer")}
    if blocks == "Flux2KleinBaseAutoBlocks":
        components["guider"] = ClassifierFreeGuidance(guidance_scale=guidance or 4.0, enabled=guidance is not None)
    pipe = _modular(blocks, components)
    pipe.register_to_config(is_distilled=distilled)
    return ours, pipe


@pytest.mark.parametrize("blocks, guidance, distilled", [
    ("Flux2KleinAutoBlocks", None, True), ("Flux2KleinBaseAutoBlocks", 4.0, False),
    ("Flux2KleinBaseAutoBlocks", None, False),
    ("Flux2KleinBaseAutoBlocks", 4.0, True),  # step-distilled: unguided whatever the guider, as diffusers
])
@pytest.mark.parametrize("composition", [dict(mode="and"), dict(expression=EXPRESSION)], ids=str)
def test_flux2_klein_modular_equals_the_superdiff_pipeline(composition, blocks, guidance, distilled):
    """The decode step gets the superdiff pipeline's VAE latents patchified and normalized, and decodes them to
    its images; under guidance the unconditional row is the empty prompt's, as the modular text step encodes it."""
    ours, pipe = klein(blocks, guidance, distilled)
    prompts = {} if "expression" in composition else {"prompts": PROMPTS}
    kw = dict(num_inference_steps=STEPS, num_images_per_prompt=2, height=16, width=16, max_sequence_length=32,
              progress=False)
    out = ours(**prompts, **composition, guidance_scale=guidance, output_type="latent", generator=seeded(6), **kw)
    rows = []
    ours.transformer.register_forward_pre_hook(lambda m, a, k: rows.append(a[0].shape[0]), with_kwargs=True)
    state = pipe(prompt=prompts.get("prompts"), **composition, output_type="pt", generator=seeded(6), **kw)
    guided = guidance is not None and not distilled
    assert rows == [2 * (2 + guided)] * STEPS  # one transformer call per step on all rows
    assert (state.get("negative_prompt_embeds") is None) == (not guided)
    assert_same_run(out, state)
    images = ours(**prompts, **composition, guidance_scale=guidance, output_type="pt", generator=seeded(6), **kw)
    torch.testing.assert_close(state.get("images").float(), images.images, rtol=0, atol=1e-6)  # float32 images


def test_flux2_klein_modular_refuses_a_negative_prompt():
    """klein base's modular text step encodes the empty prompt as the unconditional row and takes no negative
    prompt: one given is refused, not silently dropped."""
    _, pipe = klein("Flux2KleinBaseAutoBlocks", 4.0, False)
    calls = [count_calls(network) for network in (pipe.text_encoder, pipe.transformer)]
    with pytest.raises(ValueError, match=r"^negative_prompt='a cat'.*takes no negative prompt"):
        pipe(prompt=PROMPTS, negative_prompt="a cat", height=16, width=16, num_inference_steps=2, output_type="pt",
             progress=False)
    assert calls == [[], []]
