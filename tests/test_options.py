"""The sampling options declared once (superdiff/options.py): each field's check at construction, and
each field reaching the sampler through a pipeline call (tiny SD, CPU, offline)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline_reference import PROMPTS, seeded
from superdiff.expressions import Leaf, Product
from superdiff.options import Option, SamplerOptions, option_fields
from superdiff.pipelines import SuperDiffPipeline
from superdiff.testing import tiny_sd_components
from superdiff.time_grids import GRIDS

CORRECTED = Product(tuple(Leaf(p) for p in PROMPTS), correct=True)  # particles need Feynman–Kac weights


def other_value(spec: Option, default):
    """A valid value of a field other than its default, read from its declared choices or range."""
    if spec.choices is not None:
        return next(c for c in reversed(spec.choices) if c != default)  # the last: edm, not uniform (= linspace)
    if spec.kind is bool:
        return not default
    low = spec.low if spec.low is not None else default
    high = spec.high if spec.high is not None else low + 3
    value = spec.kind((low + high) / 2) if spec.kind is float else int(low) + 1
    return value if value != default else spec.kind(high)


def bad_values(spec: Option) -> list:
    """Values outside a field's declared kind, choices or range."""
    if spec.choices is not None:
        return ["no-such-choice", 1]
    if spec.kind is bool:
        return [1, "yes"]
    bad = ["1", True, math.nan, math.inf]
    if spec.low is not None:
        bad.append(spec.kind(spec.low) if spec.low_open else spec.low - 1)
    if spec.high is not None:
        bad.append(spec.kind(spec.high) if spec.high_open else spec.high + 1)
    return bad


FIELDS = [(f.name, f.default, spec) for f, spec in option_fields()]


@pytest.mark.parametrize("name, default, spec", FIELDS, ids=[f[0] for f in FIELDS])
def test_each_field_checks_its_value_at_construction_and_names_it(name, default, spec):
    assert getattr(SamplerOptions(), name) == default
    good = other_value(spec, default)
    assert getattr(SamplerOptions(**{name: good}), name) == good
    for bad in bad_values(spec):
        with pytest.raises(ValueError, match=f"^{name}=.* is not valid; use "):
            SamplerOptions(**{name: bad})


def test_from_kwargs_names_an_unknown_option_and_record_is_json():
    with pytest.raises(TypeError, match="'particle' is not a sampling option; did you mean 'particles'"):
        SamplerOptions.from_kwargs(particle=2)
    options = SamplerOptions.from_kwargs(particles=3, variance="forward")
    assert options.replace(particles=4).particles == 4 and options.particles == 3
    with pytest.raises(ValueError, match="particles=0 is not valid"):
        options.replace(particles=0)
    record = options.record()
    assert json.loads(json.dumps(record)) == record and record["particles"] == 3
    assert set(record) == {f.name for f, _ in option_fields()}
    assert SamplerOptions.from_kwargs(**record) == options


def test_the_old_names_are_the_declared_ones():
    from superdiff.density import DEFAULT_DENSITY_VARIANCE, VARIANCES
    from superdiff.options import TIME_GRIDS
    from superdiff.particles import check_particles

    field = SamplerOptions.__dataclass_fields__["density_variance"]
    assert DEFAULT_DENSITY_VARIANCE == field.default
    assert set(VARIANCES) | {"tweedie"} == set(field.metadata["option"].choices)
    assert TIME_GRIDS == ("scheduler", *GRIDS)
    with pytest.raises(ValueError, match=r"^particles=0 is not valid; use an integer >= 1 \(1: no weighted"):
        check_particles(0, 0.5)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return SuperDiffPipeline(**tiny_sd_components(tokenizer_dir=tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("name, default, spec", FIELDS, ids=[f[0] for f in FIELDS])
def test_each_field_reaches_the_sampler_from_a_pipeline_call(pipe, monkeypatch, name, default, spec):
    """A pipeline takes every field as a keyword argument and hands its value to sample_sde (the
    time grid as the times it samples at)."""
    import superdiff.pipelines._common as common

    seen = []
    real = common.sample_sde

    def spy(denoiser, x, times, combiner, **kwargs):
        seen.append(dict(kwargs, times=times))
        return real(denoiser, x, times, combiner, **kwargs)

    monkeypatch.setattr(common, "sample_sde", spy)
    value = other_value(spec, default)
    steps = 4
    out = pipe(expression=CORRECTED, num_inference_steps=steps, output_type="pt", progress=False,
               guidance_scale=5.0, generator=seeded(0), **{name: value})
    assert torch.isfinite(out.images).all()
    (kwargs,) = seen
    if name == "time_grid":
        pipe.scheduler.set_timesteps(steps)
        scheduler = torch.cat([pipe.scheduler.timesteps.double() / 999, torch.zeros(1, dtype=torch.float64)])
        expected = GRIDS[value](_process(pipe), steps - 1,
                                t_start=float(scheduler[0]), t_end=float(scheduler[-2]))
        torch.testing.assert_close(kwargs["times"][:-1], expected, rtol=0, atol=1e-12)
        assert float(kwargs["times"][-1]) == 0.0 and not torch.allclose(kwargs["times"], scheduler)
    else:
        assert kwargs[name] == value


def _process(pipe):
    from superdiff.pipelines.denoisers import process_of_scheduler

    return process_of_scheduler(pipe.scheduler)
