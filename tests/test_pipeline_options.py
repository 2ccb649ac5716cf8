"""``combiner=`` in every pipeline family: a combiner object samples exactly what the equivalent
``mode=`` call samples, any combiner (``Fixed`` weights, ``And(rtol=...)``) travels to the sampler
whole, and a combiner that conflicts with ``mode=``/``temperature=``/``log_weights=`` or does not fit
the number of prompts (unets) is refused before any network call. The sampling options: each field
of :class:`~superdiff.options.SamplerOptions`, given to each pipeline as a keyword argument or in
``options=``, reaches ``sample_sde``."""

from __future__ import annotations

import inspect

import pytest
import torch

from superdiff import And, Average, Fixed, Or, Sum, sample_sde
from superdiff.options import DEFAULT_CORRECTING_PARTICLES, SamplerOptions, option_spec
from superdiff.pipelines import (
    SuperDiffFlowPipeline,
    SuperDiffPipeline,
    SuperDiffUnconditionalPipeline,
    SuperDiffXLPipeline,
)
from superdiff.testing import (
    tiny_sd3_components,
    tiny_sd_components,
    tiny_sdxl_components,
    tiny_unconditional_components,
)

PROMPTS = ["a red circle", "a blue square"]
KW = dict(num_inference_steps=2, output_type="latent", progress=False)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def count_calls(module: torch.nn.Module) -> list:
    """Forward calls of ``module`` (a pre-hook appends to the returned list)."""
    calls: list = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.fixture(scope="module", params=["sd", "sdxl", "flow", "unconditional"])
def family(request, tmp_path_factory):
    """(pipeline, call arguments besides the combiner, the networks a refused call must not run)."""
    tok = tmp_path_factory.mktemp("tok")
    if request.param == "sd":
        pipe = SuperDiffPipeline(**tiny_sd_components(tokenizer_dir=tok))
        return pipe, dict(prompts=PROMPTS), [pipe.unet, pipe.text_encoder]
    if request.param == "sdxl":
        pipe = SuperDiffXLPipeline(**tiny_sdxl_components(tokenizer_dir=tok))
        return pipe, dict(prompts=PROMPTS), [pipe.unet, pipe.text_encoder_2]
    if request.param == "flow":
        pipe = SuperDiffFlowPipeline(**tiny_sd3_components(vae=True, tokenizer_dir=tok, t5=False))
        return pipe, dict(prompts=PROMPTS, max_sequence_length=8), [pipe.transformer, pipe.text_encoder]
    pipe = SuperDiffUnconditionalPipeline(**tiny_unconditional_components(num_models=2))
    return pipe, dict(batch_size=1), list(pipe.unets)


def run(pipe, args, **kwargs):
    return pipe(**args, **KW, generator=seeded(3), **kwargs)


@pytest.mark.parametrize("combiner, by_mode", [
    (Or(), dict(mode="or")),
    (Average(2), dict(mode="average")),
    (And(), dict(mode="and")),
    (Or(temperature=2.0, log_weights=(0.5, 0.0)), dict(mode="or", temperature=2.0, log_weights=[0.5, 0.0])),
])
def test_a_combiner_object_samples_what_the_equivalent_mode_samples(family, combiner, by_mode):
    pipe, args, _ = family
    expected = run(pipe, args, **by_mode)
    given = run(pipe, args, combiner=combiner)
    torch.testing.assert_close(given.images, expected.images, rtol=0, atol=0)
    torch.testing.assert_close(given.kappa_trace, expected.kappa_trace, rtol=0, atol=0)
    torch.testing.assert_close(given.log_density_trace, expected.log_density_trace, rtol=0, atol=0)


def test_fixed_weights_are_the_kappa_of_every_step_and_equal_weights_are_average(family):
    pipe, args, _ = family
    out = run(pipe, args, combiner=Fixed((0.7, 0.3)))
    assert out.kappa_trace.shape == (2, 1, 2)
    torch.testing.assert_close(out.kappa_trace, torch.tensor([0.7, 0.3], dtype=out.kappa_trace.dtype).expand(2, 1, 2))
    assert torch.isfinite(out.images).all()
    # κ = (½, ½) is the average of the models: the same samples as mode="average", bit for bit
    half = run(pipe, args, combiner=Fixed((0.5, 0.5)))
    torch.testing.assert_close(half.images, run(pipe, args, mode="average").images, rtol=0, atol=0)
    assert not torch.equal(half.images, out.images)


def test_and_with_its_own_tolerance_travels_to_the_sampler(family):
    pipe, args, _ = family
    tight = run(pipe, args, combiner=And(rtol=1e-10))
    default = run(pipe, args, mode="and")
    # rtol only decides what counts as a singular system; these are regular, so κ agrees closely
    torch.testing.assert_close(tight.kappa_trace, default.kappa_trace, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(combiner=Or(), mode="or"), r"^combiner=Or\(.*pass either combiner=\.\.\. or mode, not both"),
        (dict(combiner=And(), temperature=2.0), r"^combiner=And\(.*temperature"),
        (dict(combiner=Or(), log_weights=[0.0, 1.0]), r"^combiner=Or\(.*log_weights"),
        (dict(combiner=Fixed((0.7, 0.2, 0.1))), r"^weights=\(0\.7, 0\.2, 0\.1\) is not valid; pass 2 numbers"),
        (
            dict(combiner=Or(log_weights=(0.0, 1.0, 2.0))),
            r"^log_weights=\(0\.0, 1\.0, 2\.0\) is not valid; pass 2 numbers",
        ),
        (dict(combiner=And(log_weights=(1.0,))), r"^log_weights=\(1\.0,\) is not valid; pass 2 numbers"),
        (dict(combiner="and"), r"^combiner='and' is not valid; pass a combiner object"),
        (dict(combiner=And), r"^combiner=<class .*And'> is not valid; pass a combiner object"),
    ],
)
def test_conflicting_or_ill_fitting_combiners_are_refused_before_any_network_call(family, bad, message):
    pipe, args, networks = family
    calls = [count_calls(n) for n in networks]
    try:
        with pytest.raises(ValueError, match=message):
            run(pipe, args, **bad)
        assert all(c == [] for c in calls)
    finally:
        for n in networks:
            n._forward_pre_hooks.clear()


def test_or_and_and_objects_need_two_prompts_like_their_modes(tmp_path):
    pipe = SuperDiffPipeline(**tiny_sd_components(tokenizer_dir=tmp_path))
    calls = count_calls(pipe.unet)
    for combiner in (Or(), And()):
        with pytest.raises(
            ValueError, match=r"^prompts=<1 given> is not valid; mode='(or|and)' composes at least 2 prompts"
        ):
            pipe(["a red circle"], combiner=combiner, **KW)
    assert calls == []
    one = pipe(["a red circle"], combiner=Fixed((1.0,)), **KW)  # one prompt with fixed weights is fine
    assert one.kappa_trace.shape == (2, 1, 1)


def test_flow_refuses_a_non_affine_combiner_unguided_as_it_refuses_mode_sum(tmp_path):
    pipe = SuperDiffFlowPipeline(**tiny_sd3_components(vae=True, tokenizer_dir=tmp_path, t5=False))
    calls = count_calls(pipe.transformer)
    for combiner in (Sum(2), Fixed((0.7, 0.7))):
        with pytest.raises(ValueError, match=r"^the combiner's weights \(.*\) sum to (2|1\.4): without guidance, "
                           r".* guidance_scale above 1 \(e\.g\. 7\.0; it is None\)$"):
            pipe(PROMPTS, combiner=combiner, guidance_scale=None, max_sequence_length=8, **KW)
    assert calls == []
    assert (
        pipe(PROMPTS, combiner=Fixed((0.7, 0.3)), guidance_scale=None, max_sequence_length=8, **KW).images.shape[0]
        == 1
    )


# ------------------------------------------------------------------------------------------------
# Every sampling option (a field of SamplerOptions) passed to every pipeline reaches sample_sde
# ------------------------------------------------------------------------------------------------

PRODUCT = '"a red circle" * "a blue square"'  # corrects, so particles > 1 apply


def other_values(spec, default) -> list:
    """Valid values of an option other than its default, read from the field's own spec (choices last
    first: the first non-default grid, "uniform", may coincide with a scheduler's evenly spaced one)."""
    if spec.choices is not None:
        return [c for c in spec.choices if c != default][::-1]
    if spec.kind is bool:
        return [not default]
    if spec.kind is int:
        return [(spec.low if default is None else default) + 1]  # None: the composition's K (particles)
    return [(default + spec.high) / 2 if spec.high is not None else default + 1.0]


@pytest.fixture(scope="module", params=["sd", "sdxl", "flow", "flux", "unconditional"])
def every_family(request, tmp_path_factory):
    """(pipeline, call arguments of a correcting composition) for each family."""
    tok = tmp_path_factory.mktemp("tok")
    text = dict(expression=PRODUCT)
    if request.param == "sd":
        return SuperDiffPipeline(**tiny_sd_components(tokenizer_dir=tok)), text
    if request.param == "sdxl":
        return SuperDiffXLPipeline(**tiny_sdxl_components(tokenizer_dir=tok)), text
    if request.param == "flow":
        return SuperDiffFlowPipeline(**tiny_sd3_components(tokenizer_dir=tok)), dict(text, max_sequence_length=8)
    if request.param == "flux":
        from superdiff.pipelines import SuperDiffFluxPipeline
        from test_pipelines_flux import tiny_flux_components

        pipe = SuperDiffFluxPipeline(**tiny_flux_components(tok))
        # unguided flow sampling needs weights that sum to 1: a geometric mean, which corrects too
        return pipe, dict(expression='"a red circle" ^ 0.5 * "a blue square" ^ 0.5', height=16, width=16,
                          max_sequence_length=8)
    return SuperDiffUnconditionalPipeline(**tiny_unconditional_components(num_models=2)), dict(expression="0 * 1")


@pytest.fixture
def sampler_calls(monkeypatch):
    """The arguments of every sample_sde call the pipelines make that the (real) sampler accepts."""
    import superdiff.pipelines.base as loop

    calls, real = [], loop.sample_sde

    def recording(denoiser, x, times, combiner, **kwargs):
        out = real(denoiser, x, times, combiner, **kwargs)
        calls.append(dict(kwargs, times=times.clone()))  # the calls the sampler accepted
        return out

    monkeypatch.setattr(loop, "sample_sde", recording)
    return calls


def reached(call: dict, default: dict, name: str, value) -> bool:
    """Whether option ``name`` = ``value`` reached the sampler: as its argument of that name, or (an
    option of the time grid) as the times it visits."""
    if name in inspect.signature(sample_sde).parameters:
        return call[name] == value and default[name] != value
    return call["times"].shape != default["times"].shape or not torch.equal(call["times"], default["times"])


@pytest.mark.parametrize("name", SamplerOptions.names())
def test_every_sampling_option_given_to_every_pipeline_reaches_sample_sde(every_family, sampler_calls, name):
    pipe, args = every_family
    three = dict(args, num_inference_steps=3)  # three steps: a time grid other than the scheduler's differs
    three |= {k: v for k, v in KW.items() if k not in three}
    pipe(**three, generator=seeded(3))
    for value in other_values(option_spec(name), SamplerOptions.__dataclass_fields__[name].default):
        try:  # some values do not apply to a family's process (e.g. the EDM grid to a flow, which has α = 0)
            pipe(**three, generator=seeded(3), **{name: value})
        except ValueError as exc:
            assert "does not" in str(exc) and name in str(exc)
            continue
        pipe(**three, generator=seeded(3), options=SamplerOptions(**{name: value}))
        break
    default, keyword, whole = sampler_calls
    assert reached(keyword, default, name, value), f"{name}={value!r} as a keyword argument"
    assert reached(whole, default, name, value), f"{name}={value!r} in options="


def test_an_expression_that_corrects_runs_the_default_particles_unless_given(every_family, sampler_calls):
    """Issue 28 item 15: no particles= means DEFAULT_CORRECTING_PARTICLES per image for a composition that
    corrects (each family's PRODUCT-like expression here), particles=1 its uncorrected tree."""
    pipe, args = every_family
    run(pipe, args)
    run(pipe, args, particles=1)
    default, one = sampler_calls
    assert (default["particles"], one["particles"]) == (DEFAULT_CORRECTING_PARTICLES, 1)


def test_options_whole_with_keywords_over_it_and_unknown_or_bad_options_refused(every_family, sampler_calls):
    pipe, args = every_family
    run(pipe, args, options=SamplerOptions(density_variance="forward", resample_threshold=0.75), particles=2)
    (call,) = sampler_calls
    assert (call["density_variance"], call["resample_threshold"], call["particles"]) == ("forward", 0.75, 2)
    with pytest.raises(TypeError, match=r"^'particle' is not a sampling option; did you mean 'particles'\?"):
        run(pipe, args, particle=2)
    with pytest.raises(TypeError, match=r"^options=\{'particles': 2\} is not a SamplerOptions; pass SamplerOptions"):
        run(pipe, args, options={"particles": 2})
    with pytest.raises(ValueError, match=r"^density_variance='exact' is not valid; use one of"):
        run(pipe, args, density_variance="exact")
    assert len(sampler_calls) == 1
