"""The sampling options declared once (superdiff/options.py): each field's check at construction, and
each field reaching the sampler through a pipeline call (tiny SD, CPU, offline)."""

from __future__ import annotations

import json

import pytest
import torch

from options_values import bad_values, other_value
from pipeline_reference import PROMPTS, seeded
from superdiff.expressions import Leaf, Product
from superdiff.options import SamplerOptions, option_fields
from superdiff.pipelines import SuperDiffPipeline
from superdiff.testing import tiny_sd_components
from superdiff.time_grids import GRIDS

CORRECTED = Product(tuple(Leaf(p) for p in PROMPTS), correct=True)  # particles need Feynman–Kac weights


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
    assert SamplerOptions.from_kwargs(options=options, particles=5) == options.replace(particles=5)
    with pytest.raises(TypeError, match="options=.* is not a SamplerOptions"):
        SamplerOptions.from_kwargs(options={"particles": 2})


def test_the_old_names_are_the_declared_ones():
    from superdiff.density import DEFAULT_DENSITY_VARIANCE, VARIANCES
    from superdiff.options import TIME_GRIDS
    from superdiff.particles import check_particles

    field = SamplerOptions.__dataclass_fields__["density_variance"]
    assert DEFAULT_DENSITY_VARIANCE == field.default
    assert set(VARIANCES) | {"tweedie"} == set(field.metadata["option"].choices)
    assert TIME_GRIDS == ("scheduler", *GRIDS)
    with pytest.raises(ValueError, match=r"^particles=0 is not valid; use an integer >= 1 or None \(4 for an "
                                         r"expression that corrects, else 1\) \(1: no weighted"):
        check_particles(0, 0.5)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return SuperDiffPipeline(**tiny_sd_components(tokenizer_dir=tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("name, default, spec", FIELDS, ids=[f[0] for f in FIELDS])
def test_each_field_reaches_the_sampler_from_a_pipeline_call(pipe, monkeypatch, name, default, spec):
    """A pipeline takes every field as a keyword argument and hands its value to sample_sde (the
    time grid as the times it samples at)."""
    import superdiff.pipelines.base as common  # the loop calls sample_sde there

    seen = []
    real = common.sample_sde

    def spy(denoiser, x, times, combiner, **kwargs):
        seen.append(dict(kwargs, times=times))
        return real(denoiser, x, times, combiner, **kwargs)

    monkeypatch.setattr(common, "sample_sde", spy)
    value = other_value(spec, default)
    steps = 4
    call = dict(expression=CORRECTED, num_inference_steps=steps, output_type="pt", progress=False,
                guidance_scale=5.0)
    out = pipe(**call, generator=seeded(0), **{name: value})
    whole = pipe(**call, generator=seeded(0), options=SamplerOptions(**{name: value}))  # the object whole
    torch.testing.assert_close(whole.images, out.images, rtol=0, atol=0)
    assert torch.isfinite(out.images).all()
    kwargs, again = seen
    assert {k: v for k, v in kwargs.items() if k not in ("times", "generator", "callback", "interrupt")} == {
        k: v for k, v in again.items() if k not in ("times", "generator", "callback", "interrupt")}
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
