"""``superdiff.compose(pipe, ...)`` and ``SuperDiffBasePipeline.from_pipe(pipe)``: an already loaded diffusers
pipeline of each supported family is composed by that family's superdiff pipeline, sharing its modules, and
samples exactly what that pipeline built from the same components samples; other pipelines are refused by name."""

from __future__ import annotations

import pytest
import torch

import superdiff
from superdiff.pipelines import (
    SuperDiffBasePipeline,
    SuperDiffFlowPipeline,
    SuperDiffFluxPipeline,
    SuperDiffPipeline,
    SuperDiffUnconditionalPipeline,
    SuperDiffXLPipeline,
)

TWO = ["a red circle", "a blue square"]
KW = dict(num_inference_steps=2, output_type="latent", progress=False)


def families(tmp_path):
    """(diffusers pipeline, the superdiff class that composes it, its components, call arguments) per family."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    import superdiff.testing as t
    from test_pipelines_flux import tiny_flux_components

    sd = t.tiny_sd_components(tokenizer_dir=tmp_path)
    xl = t.tiny_sdxl_components(tokenizer_dir=tmp_path)
    sd3 = t.tiny_sd3_components(tokenizer_dir=tmp_path)
    flux = tiny_flux_components(tmp_path)
    text = dict(prompts=TWO, mode="and")
    return [
        (StableDiffusionPipeline(**sd, safety_checker=None, feature_extractor=None, requires_safety_checker=False),
         SuperDiffPipeline, sd, text),
        (StableDiffusionXLPipeline(**xl), SuperDiffXLPipeline, xl, text),
        (StableDiffusion3Pipeline(**sd3), SuperDiffFlowPipeline, sd3, dict(text, max_sequence_length=8)),
        (FluxPipeline(**flux), SuperDiffFluxPipeline, flux, dict(text, height=16, width=16, max_sequence_length=8)),
    ]


def test_compose_picks_the_family_shares_the_modules_and_samples_what_the_family_pipeline_samples(tmp_path):
    for pipe, family, components, args in families(tmp_path):
        composed = SuperDiffBasePipeline.from_pipe(pipe)
        assert type(composed) is family
        assert composed.text_encoder is pipe.text_encoder and composed.scheduler is pipe.scheduler
        out = superdiff.compose(pipe, generator=torch.Generator().manual_seed(5), **args, **KW)
        expected = family(**components)(generator=torch.Generator().manual_seed(5), **args, **KW)
        torch.testing.assert_close(out.images, expected.images, rtol=0, atol=0)
        torch.testing.assert_close(out.kappa_trace, expected.kappa_trace, rtol=0, atol=0)


def test_compose_of_ddpm_pipelines_is_the_unconditional_stack_and_a_superdiff_pipeline_is_called_as_is(tmp_path):
    from diffusers import DDPMPipeline

    import superdiff.testing as t

    comps = t.tiny_unconditional_components(num_models=2)
    pipes = [DDPMPipeline(unet=u, scheduler=comps["scheduler"]) for u in comps["unets"]]
    assert type(SuperDiffBasePipeline.from_pipe(pipes)) is SuperDiffUnconditionalPipeline
    out = superdiff.compose(pipes, mode="or", generator=torch.Generator().manual_seed(2), **KW)
    expected = SuperDiffUnconditionalPipeline(**comps)(mode="or", generator=torch.Generator().manual_seed(2), **KW)
    torch.testing.assert_close(out.images, expected.images, rtol=0, atol=0)
    ours = SuperDiffPipeline(**t.tiny_sd_components(tokenizer_dir=tmp_path))
    again = superdiff.compose(ours, TWO, generator=torch.Generator().manual_seed(1), **KW)
    torch.testing.assert_close(again.images, ours(TWO, generator=torch.Generator().manual_seed(1), **KW).images)


def test_compose_refuses_a_pipeline_it_has_no_family_for_by_name():
    from diffusers import DDPMPipeline

    import superdiff.testing as t

    comps = t.tiny_unconditional_components(num_models=1)
    with pytest.raises(ValueError, match=r"^pipe=<a DDPMPipeline> is not valid: superdiff composes .*"
                                         r"StableDiffusionPipeline.*a list of DDPMPipeline"):
        superdiff.compose(DDPMPipeline(unet=comps["unets"][0], scheduler=comps["scheduler"]), mode="or")
    with pytest.raises(ValueError, match=r"^pipe=<a dict> is not valid"):
        SuperDiffBasePipeline.from_pipe({})


def test_the_unconditional_call_is_the_template_with_batch_size_first():
    """The unconditional stack's ``__call__`` is generated from the same template as the text families': every
    argument it shares has the template's kind and annotation and the template's default unless the family
    names its own; what it leaves out is the image size, the embeddings and the other families' arguments."""
    import inspect

    cls = SuperDiffUnconditionalPipeline
    template = inspect.signature(SuperDiffBasePipeline.__call__).parameters
    ours = inspect.signature(cls.__call__).parameters
    assert list(ours)[:3] == ["self", "batch_size", "prompts"]
    for name, p in ours.items():
        if name in ("self", "batch_size"):
            continue
        t = template[name]
        assert (p.kind, p.annotation) == (t.kind, t.annotation), name
        assert p.default == cls.call_defaults.get(name, t.default), name
    left_out = set(template) - set(ours)
    assert left_out == set(cls.call_without) | set(SuperDiffBasePipeline.FAMILY_ARGUMENTS)
    assert (ours["num_images_per_prompt"].default, ours["guidance_scale"].default) == (None, None)


def test_each_family_call_spells_the_diffusers_arguments_with_its_own_defaults(tmp_path):
    import inspect

    import superdiff.testing as t

    def defaults(cls):
        return {n: p.default for n, p in inspect.signature(cls.__call__).parameters.items()}

    sd, flow, flux = defaults(SuperDiffPipeline), defaults(SuperDiffFlowPipeline), defaults(SuperDiffFluxPipeline)
    shared = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "generator", "latents",
              "output_type", "height", "width", "num_images_per_prompt", "callback_on_step_end", "return_dict")
    assert all(name in family for family in (sd, defaults(SuperDiffXLPipeline), flow, flux) for name in shared)
    assert (sd["num_inference_steps"], sd["guidance_scale"]) == (50, 7.5)
    assert (flow["num_inference_steps"], flow["guidance_scale"], flow["max_sequence_length"]) == (28, 7.0, 256)
    assert (flux["guidance_scale"], flux["true_cfg_scale"], flux["max_sequence_length"]) == (3.5, 1.0, 512)
    assert "true_cfg_scale" not in sd and "max_sequence_length" not in sd and "true_cfg_scale" not in flow
    # the positional order of the diffusers pipelines' first arguments
    assert list(sd)[1:5] == ["prompts", "mode", "guidance_scale", "num_inference_steps"]
    # an argument of another family is not a sampling option either: refused before any network call
    pipe = SuperDiffPipeline(**t.tiny_sd_components(tokenizer_dir=tmp_path))
    with pytest.raises(TypeError, match=r"^'true_cfg_scale' is not a sampling option"):
        pipe(TWO, true_cfg_scale=4.0, **KW)
