"""Composition expressions and weighted particles through the pipelines (tiny SD, CPU, offline):
an expression of AND / OR is today's mode exactly, every leaf is evaluated once in one batched call,
K particles cost K rows and give one image each, and bad input is refused before any network call."""

from __future__ import annotations

import pytest
import torch

from pipeline_reference import PROMPTS, STEPS, count_calls, seeded
from superdiff.expressions import And, Leaf, Not, Or, Product
from superdiff.pipelines import SuperDiffPipeline
from superdiff.testing import tiny_sd_components

A, B = (Leaf(p) for p in PROMPTS)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return SuperDiffPipeline(**tiny_sd_components(tokenizer_dir=tmp_path_factory.mktemp("tok")))


def _call(pipe, **kw):
    base = dict(num_inference_steps=STEPS, output_type="pt", progress=False, guidance_scale=5.0, generator=seeded(0))
    return pipe(**(base | kw))


@pytest.mark.parametrize("mode, node", [("and", And((A, B))), ("or", Or((A, B)))])
def test_an_expression_of_and_or_is_the_mode_exactly(pipe, mode, node):
    flat = _call(pipe, prompts=PROMPTS, mode=mode, num_images_per_prompt=2)
    tree = _call(pipe, expression=node, num_images_per_prompt=2)
    torch.testing.assert_close(tree.images, flat.images, atol=1e-6, rtol=0)
    torch.testing.assert_close(tree.kappa_trace, flat.kappa_trace, atol=1e-6, rtol=1e-6)
    assert tree.log_weights is None and len(tree.node_weight_trace) == 1


def test_every_leaf_once_in_one_batched_call_and_k_particles_per_image(pipe):
    calls = count_calls(pipe.unet)
    rows = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: rows.append(args[0].shape[0]),
                                                 with_kwargs=True)
    try:
        # "a red circle" twice, "" (NOT's reference) once: three leaves, plus the unconditional row.
        node = Product((A, Not(B, Leaf(""), 1.0), Or((A, B))), (0.5, 0.25, 0.25))
        out = _call(pipe, expression=node, num_images_per_prompt=3, particles=4)
    finally:
        handle.remove()
    assert len(calls) == STEPS and set(rows) == {(3 + 1) * 3 * 4}
    assert out.images.shape[0] == 3 and out.kappa_trace.shape == (STEPS, 3, 3)
    assert out.ess_trace.shape == (STEPS - 1, 3) and out.resample_counts.shape == (3,)
    assert bool((out.log_weights <= 1e-12).all())  # relative to the group: log of the image's share
    assert [w.shape[-1] for w in out.node_weight_trace] == [3, 2, 2]


def test_an_image_s_particles_depend_on_its_generator_only(pipe):
    node = Product((A, B), correct=True)
    one = _call(pipe, expression=node, particles=2, generator=[seeded(5)])
    two = _call(pipe, expression=node, particles=2, num_images_per_prompt=2, generator=[seeded(5), seeded(6)])
    torch.testing.assert_close(two.images[:1], one.images, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(expression=And((A, B)), prompts=PROMPTS), "expression"),
        (dict(expression=And((A, B)), mode="or"), "expression"),
        (dict(expression=And((A, Leaf(0)))), "model index"),
        (dict(expression="not an expression object".split()), "expression"),
        (dict(prompts=PROMPTS, particles=0), "particles"),
        (dict(prompts=PROMPTS, particles=2, resample_threshold=0.0), "resample_threshold"),
        (dict(expression=Product((A, B)), particles=2, latents=torch.zeros(1, 4, 8, 8)), "latents"),
        # Particles weigh Feynman–Kac corrections: a mode, or an expression that corrects nothing, has none.
        (dict(prompts=PROMPTS, particles=2), "particles=2 weight an expression's Feynman–Kac corrections"),
        (dict(expression=Or((A, B)), particles=3), "particles=3 weight an expression's Feynman–Kac corrections"),
        (dict(expression=Or((Product((A, B)), A))), "degree"),
    ],
)
def test_bad_compositions_are_refused_before_any_network_call(pipe, kw, message):
    calls = count_calls(pipe.text_encoder)
    with pytest.raises(ValueError, match=message):
        _call(pipe, **kw)
    assert calls == []


@pytest.mark.parametrize("family", ["sdxl", "flow", "unconditional"])
def test_every_family_takes_an_expression_and_it_is_the_mode_exactly(family, tmp_path):
    """The other pipelines share the path: an Or node over the prompts (over the models' indices for
    the unconditional stack) is mode="or" to the bit, and a corrected soft-min runs K particles."""
    from superdiff.pipelines import SuperDiffFlowPipeline, SuperDiffUnconditionalPipeline, SuperDiffXLPipeline
    from superdiff.testing import tiny_sd3_components, tiny_sdxl_components, tiny_unconditional_components

    base = dict(num_inference_steps=STEPS, output_type="pt", progress=False)
    if family == "unconditional":
        pipe = SuperDiffUnconditionalPipeline(**tiny_unconditional_components(num_models=2))
        flat_kw, tree_kw, soft = dict(mode="or"), dict(expression="0 | 1"), "softmin(0, 1)[sharpness=2]"
        base |= dict(batch_size=2)
    else:
        pipe = (SuperDiffXLPipeline(**tiny_sdxl_components(tokenizer_dir=tmp_path)) if family == "sdxl"
                else SuperDiffFlowPipeline(**tiny_sd3_components()))
        flat_kw, tree_kw = dict(prompts=PROMPTS, mode="or"), dict(expression=f'"{PROMPTS[0]}" | "{PROMPTS[1]}"')
        soft = f'softmin("{PROMPTS[0]}", "{PROMPTS[1]}")[sharpness=2]'
        base |= dict(num_images_per_prompt=2, guidance_scale=5.0)
    flat = pipe(**flat_kw, generator=seeded(1), **base)
    tree = pipe(**tree_kw, generator=seeded(1), **base)
    assert torch.equal(flat.images, tree.images) and torch.equal(flat.log_density_trace, tree.log_density_trace)
    out = pipe(expression=soft, particles=3, generator=seeded(2), **base)
    assert out.images.shape[0] == 2 and torch.isfinite(out.log_weights).all() and out.resample_counts.shape == (2,)


def test_the_pipelines_default_to_the_tweedie_density_variance_and_take_forward(pipe):
    """density_variance reaches the sampler: by default ("tweedie") OR's and AND's steps are scored with each
    prompt's own variance (the first step as "forward", so the first increment is the same), with the same
    network calls; AND's tracked densities stay equal; an unknown name is refused before any network call."""
    forward = _call(pipe, prompts=PROMPTS, mode="or", num_images_per_prompt=2, density_variance="forward")
    calls = count_calls(pipe.unet)
    tweedie = _call(pipe, prompts=PROMPTS, mode="or", num_images_per_prompt=2)
    assert len(calls) == STEPS
    assert torch.equal(forward.log_density_trace[1], tweedie.log_density_trace[1])
    assert not torch.allclose(forward.log_density_trace[-1], tweedie.log_density_trace[-1])
    assert torch.isfinite(tweedie.log_density_trace).all()
    and_forward = _call(pipe, prompts=PROMPTS, mode="and", num_images_per_prompt=2, density_variance="forward")
    and_tweedie = _call(pipe, prompts=PROMPTS, mode="and", num_images_per_prompt=2)
    assert not torch.allclose(and_forward.log_density_trace[-1], and_tweedie.log_density_trace[-1])
    gap = and_tweedie.log_density_trace[..., 0] - and_tweedie.log_density_trace[..., 1]
    assert float(gap.abs().max()) < 1e-6 * (1 + float(and_tweedie.log_density_trace.abs().max()))
    text_calls = count_calls(pipe.text_encoder)
    with pytest.raises(ValueError, match="density_variance='exact' is not valid; use one of"):
        _call(pipe, prompts=PROMPTS, mode="or", density_variance="exact")
    assert text_calls == []
