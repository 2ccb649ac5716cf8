"""SuperDiffFlowPipeline (SD3-style flow matching) on tiny seeded models (CPU, offline): traces against the
independent loop of pipeline_reference.py with diffusers' own SD3 text encoding, saving and loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_reference import (
    PROMPTS,
    STEPS,
    PerConditionDenoiser,
    assert_traces_match,
    count_calls,
    reference_loop,
    run_with_states,
    seeded,
)

# ------------------------------------------------------------------------------------------------
# SD3-style flow matching (velocity prediction, starts at σ = 1 where α = 0)
# ------------------------------------------------------------------------------------------------


def sd3_pipes(tmp_path, vae=True, t5=False):
    from diffusers import StableDiffusion3Pipeline

    from superdiff.pipelines import SuperDiffFlowPipeline
    from superdiff.testing import tiny_sd3_components

    comps = tiny_sd3_components(vae=vae, tokenizer_dir=tmp_path, t5=t5)
    ours = SuperDiffFlowPipeline(**comps)
    return ours, StableDiffusion3Pipeline(**comps)


@pytest.mark.parametrize(
    "mode, t5, w", [("and", False, 4.0), ("or", False, 4.0), ("and", True, 4.0), ("and", False, None)]
)
def test_flow_traces_match_independent_loop(mode, t5, w, tmp_path):
    ours, sd3 = sd3_pipes(tmp_path, t5=t5)
    assert (ours.text_encoder_3 is not None) == t5
    ours.to(torch.float64)
    out, states = run_with_states(
        ours,
        PROMPTS,
        mode=mode,
        num_inference_steps=STEPS,
        guidance_scale=w,
        num_images_per_prompt=2,
        generator=seeded(6),
        output_type="latent",
        progress=False,
        max_sequence_length=8,
    )
    sched = ours.scheduler
    sched.set_timesteps(STEPS)
    sigmas = [float(s) for s in sched.sigmas.double()]
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    grid = [(1.0 - s, s) for s in sigmas]  # x_t = (1 − t) x₀ + t ε, t = σ
    with torch.no_grad():  # diffusers' own SD3 text encoding, one prompt at a time (negative: "")
        conds = [
            sd3.encode_prompt(p, None, None, device="cpu", do_classifier_free_guidance=True, max_sequence_length=8)
            for p in PROMPTS
        ]
        embeds = [c[0].double() for c in conds] + [conds[0][1].double()]
        pooled = [c[2].double() for c in conds] + [conds[0][3].double()]

        def x0(x, i, k):  # velocity u = ε − x₀  ⇒  x̂₀ = x − t u
            b = x.shape[0]
            u = ours.transformer(
                x,
                timestep=torch.full((b,), sigmas[i] * 1000.0),
                encoder_hidden_states=embeds[k].expand(b, -1, -1),
                pooled_projections=pooled[k].expand(b, -1),
            ).sample
            return x - sigmas[i] * u

        g = seeded(6)
        start = torch.randn(2, 4, 8, 8, generator=g).double()
        ref = reference_loop(PerConditionDenoiser(x0, 2), grid, start, g, mode, w, states=states)
    assert_traces_match(out, *ref, out.images, rtol=1e-8)


def test_flow_finite_from_sigma_one_determinism_round_trip_and_from_pipe(tmp_path):
    from superdiff.pipelines import SuperDiffFlowPipeline

    ours, sd3 = sd3_pipes(tmp_path / "tok")
    kw = dict(num_inference_steps=5, num_images_per_prompt=2, output_type="np", progress=False, max_sequence_length=8)
    for mode in ("and", "or", "average", "sum"):
        out = ours(PROMPTS, mode=mode, generator=seeded(0), **kw)
        assert float(out.timesteps[0]) == 1000.0  # σ = 1, α = 0
        assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all()
        assert torch.isfinite(out.log_density_trace).all() and torch.isfinite(out.kappa_trace).all()
    again = ours(PROMPTS, mode="sum", generator=seeded(0), **kw)
    np.testing.assert_array_equal(out.images, again.images)
    negative = ours(PROMPTS, mode="sum", generator=seeded(0), negative_prompt="a cat", **kw).images
    assert not np.array_equal(out.images, negative)
    np.testing.assert_array_equal(
        negative, ours(PROMPTS, mode="sum", generator=seeded(0), negative_prompt=("a cat",), **kw).images
    )
    ours.save_pretrained(tmp_path / "flow")
    loaded = SuperDiffFlowPipeline.from_pretrained(tmp_path / "flow", local_files_only=True)
    np.testing.assert_array_equal(out.images, loaded(PROMPTS, mode="sum", generator=seeded(0), **kw).images)
    shared = SuperDiffFlowPipeline.from_pipe(sd3)
    assert shared.transformer is sd3.transformer
    pixel, _ = sd3_pipes(tmp_path / "tok2", vae=False)
    assert pixel(
        PROMPTS, generator=seeded(0), output_type="latent", **{k: v for k, v in kw.items() if k != "output_type"}
    ).images.shape == (2, 4, 8, 8)
    calls = count_calls(ours.transformer)
    for bad, start in [
        (dict(height=15), "height="),
        (dict(prompts=["a cat"]), "prompts="),
        (dict(guidance_scale=-0.5), "guidance_scale="),
        (dict(guidance_scale=None, mode="sum"), r"the combiner's weights \(1.0, 1.0\) sum to 2: "),
    ]:
        with pytest.raises(ValueError, match=f"^{start}"):
            ours(**(dict(prompts=PROMPTS, progress=False) | bad))
    assert calls == []


def test_a_dynamically_shifting_scheduler_gets_stable_diffusion_3s_time_grid(tmp_path):
    """SD3.5's schedulers shift σ by μ from the image's token count (``use_dynamic_shifting``): the grid
    sampled is the one diffusers' own ``StableDiffusion3Pipeline`` sets on the same scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    ours, sd3 = sd3_pipes(tmp_path)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.16,
                                              base_image_seq_len=4, max_image_seq_len=64)
    ours.scheduler = sd3.scheduler = dynamic
    kw = dict(num_inference_steps=3, output_type="latent", max_sequence_length=8)
    grids = {}
    for height, width in ((16, 16), (16, 32)):  # 16 and 32 tokens: two shifts
        sd3(prompt=PROMPTS[0], height=height, width=width, guidance_scale=1.0, **kw)
        theirs = dynamic.timesteps.double().clone()
        out = ours(PROMPTS, height=height, width=width, progress=False, **kw)
        torch.testing.assert_close(out.timesteps.double(), theirs, rtol=1e-6, atol=0)
        grids[width] = theirs
    assert not torch.allclose(grids[16], grids[32])  # the shift follows the image's size
