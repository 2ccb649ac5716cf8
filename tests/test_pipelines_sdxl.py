"""SuperDiffXLPipeline (SDXL) on tiny seeded models (CPU, offline): traces against the independent loop
of pipeline_reference.py with diffusers' own SDXL text encoding, saving and loading."""

from __future__ import annotations

import math

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
# SDXL (two encoders, pooled embeddings, time ids)
# ------------------------------------------------------------------------------------------------


def sdxl_pipes(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from superdiff.pipelines import SuperDiffXLPipeline
    from superdiff.testing import tiny_sdxl_components

    ours = SuperDiffXLPipeline(**tiny_sdxl_components(tokenizer_dir=tmp_path)).to(torch.float64)
    return ours, StableDiffusionXLPipeline(
        **{k: v for k, v in ours.components.items() if k != "force_zeros_for_empty_prompt"}
    )


@pytest.mark.parametrize("mode, w", [("and", 5.0), ("or", 5.0), ("or", None)])
def test_sdxl_traces_match_independent_loop(mode, w, tmp_path):
    ours, diffusers_xl = sdxl_pipes(tmp_path)
    out, states = run_with_states(
        ours,
        PROMPTS,
        mode=mode,
        num_inference_steps=STEPS,
        guidance_scale=w,
        num_images_per_prompt=2,
        generator=seeded(4),
        output_type="latent",
        progress=False,
    )
    assert out.images.shape == (2, 4, 8, 8)
    sched = ours.scheduler
    sched.set_timesteps(STEPS)
    abar = sched.alphas_cumprod.double()
    timesteps = [int(t) for t in sched.timesteps]
    grid = [(1.0, math.sqrt((1 - abar[t]) / abar[t])) for t in timesteps] + [(1.0, 0.0)]
    with torch.no_grad():  # diffusers' own SDXL text encoding, one prompt at a time; zeros for the unconditional
        conds = [
            diffusers_xl.encode_prompt(p, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
            for p in PROMPTS
        ]
        embeds = [c[0] for c in conds] + [conds[0][1]]
        pooled = [c[2] for c in conds] + [conds[0][3]]
        assert float(embeds[-1].abs().max()) == 0.0
        time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]], dtype=torch.float64)

        def x0(x, i, k):
            sigma = grid[i][1]
            b = x.shape[0]
            eps = ours.unet(
                x / math.sqrt(sigma**2 + 1),
                torch.tensor(float(timesteps[i])),
                encoder_hidden_states=embeds[k].expand(b, -1, -1),
                added_cond_kwargs={"text_embeds": pooled[k].expand(b, -1), "time_ids": time_ids.expand(b, -1)},
            ).sample
            return x - sigma * eps

        g = seeded(4)
        start = float(sched.init_noise_sigma) * torch.randn(2, 4, 8, 8, generator=g).double()
        ref = reference_loop(PerConditionDenoiser(x0, 2), grid, start, g, mode, w, states=states)
    assert_traces_match(out, *ref, out.images, rtol=1e-8)


def test_sdxl_images_determinism_round_trip_and_from_pipe(tmp_path):
    from superdiff.pipelines import SuperDiffXLPipeline

    ours, diffusers_xl = sdxl_pipes(tmp_path / "tok")
    ours.to(torch.float32)
    kw = dict(mode="and", num_inference_steps=3, output_type="np", progress=False)
    a = ours(PROMPTS, generator=seeded(0), **kw)
    assert a.images.shape == (1, 16, 16, 3) and np.isfinite(a.images).all()
    np.testing.assert_array_equal(a.images, ours(PROMPTS, generator=seeded(0), **kw).images)
    neg = ours(PROMPTS, generator=seeded(0), negative_prompt="a cat", **kw)
    assert not np.array_equal(a.images, neg.images)
    np.testing.assert_array_equal(
        neg.images, ours(PROMPTS, generator=seeded(0), negative_prompt=["a cat"], **kw).images
    )
    ours.save_pretrained(tmp_path / "xl")
    loaded = SuperDiffXLPipeline.from_pretrained(tmp_path / "xl", local_files_only=True)
    np.testing.assert_array_equal(a.images, loaded(PROMPTS, generator=seeded(0), **kw).images)
    shared = SuperDiffXLPipeline.from_pipe(diffusers_xl)
    assert shared.unet is diffusers_xl.unet and shared.text_encoder_2 is diffusers_xl.text_encoder_2
    np.testing.assert_array_equal(a.images, shared(PROMPTS, generator=seeded(0), **kw).images)
    calls = count_calls(ours.unet)
    with pytest.raises(ValueError, match="^height="):
        ours(PROMPTS, height=17, progress=False)
    assert calls == []
