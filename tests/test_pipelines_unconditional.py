"""SuperDiffUnconditionalPipeline, a stack of separately trained UNet2DModels (CPU, offline): traces
against the independent loop of pipeline_reference.py, saving and loading, bad inputs."""

from __future__ import annotations

import math

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

# ------------------------------------------------------------------------------------------------
# Separately trained unconditional UNet2DModels (DDPM schedule, VP process)
# ------------------------------------------------------------------------------------------------


def vp_grid(sched, steps):
    """(α, σ) = (sqrt(ᾱ_k), sqrt(1 − ᾱ_k)) at the scheduler's timesteps, then the clean end (1, 0)."""
    sched.set_timesteps(steps)
    abar = sched.alphas_cumprod.double()
    timesteps = [int(t) for t in sched.timesteps]
    return timesteps, [(math.sqrt(abar[t]), math.sqrt(1 - abar[t])) for t in timesteps] + [(1.0, 0.0)]


@pytest.mark.parametrize("mode", ["or", "and", "sum"])
def test_unconditional_traces_match_independent_loop(mode):
    from superdiff.pipelines import SuperDiffUnconditionalPipeline
    from superdiff.testing import tiny_unconditional_components

    comps = tiny_unconditional_components(num_models=2)
    pipe = SuperDiffUnconditionalPipeline(**comps).to(torch.float64)
    out, states = run_with_states(
        pipe,
        batch_size=2,
        mode=mode,
        num_inference_steps=STEPS,
        generator=seeded(1),
        output_type="latent",
        progress=False,
    )
    timesteps, grid = vp_grid(pipe.scheduler, STEPS)

    def x0(x, i, k):  # ε-prediction: x̂₀ = (x − σ ε)/α
        alpha, sigma = grid[i]
        return (x - sigma * pipe.unets[k](x, timesteps[i]).sample) / alpha

    g = seeded(1)
    start = torch.randn(2, 3, 8, 8, generator=g).double()  # init_noise_sigma = 1
    with torch.no_grad():
        ref = reference_loop(PerConditionDenoiser(x0, 2), grid, start, g, mode, None, states=states)
    assert_traces_match(out, *ref, out.images, rtol=1e-8)
    if mode == "and":
        assert float((out.log_density_trace[..., 0] - out.log_density_trace[..., 1]).abs().max()) < 1e-8


def test_unconditional_shapes_determinism_round_trip_and_from_pipe(tmp_path):
    from diffusers import DDPMPipeline

    from superdiff.pipelines import SuperDiffUnconditionalPipeline
    from superdiff.testing import tiny_unconditional_components

    pipe = SuperDiffUnconditionalPipeline(**tiny_unconditional_components(num_models=3))
    kw = dict(batch_size=2, mode="or", num_inference_steps=3, output_type="np", progress=False)
    a, b = pipe(generator=seeded(0), **kw), pipe(generator=seeded(0), **kw)
    assert (
        a.images.shape == (2, 8, 8, 3) and a.kappa_trace.shape == (3, 2, 3) and a.log_density_trace.shape == (4, 2, 3)
    )
    np.testing.assert_array_equal(a.images, b.images)
    torch.testing.assert_close(
        a.kappa_trace.double(), torch.softmax(a.log_density_trace[:-1], -1), rtol=1e-5, atol=1e-6
    )
    pipe.save_pretrained(tmp_path / "stack")
    loaded = SuperDiffUnconditionalPipeline.from_pretrained(tmp_path / "stack", local_files_only=True)
    np.testing.assert_array_equal(a.images, loaded(generator=seeded(0), **kw).images)
    ddpms = [DDPMPipeline(unet=u, scheduler=pipe.scheduler) for u in pipe.unets]
    for i, d in enumerate(ddpms):
        d.save_pretrained(tmp_path / f"ddpm{i}")
    from_folders = SuperDiffUnconditionalPipeline.from_pretrained(
        [tmp_path / f"ddpm{i}" for i in range(3)], local_files_only=True
    )
    np.testing.assert_array_equal(a.images, from_folders(generator=seeded(0), **kw).images)
    shared = SuperDiffUnconditionalPipeline.from_pipe(ddpms)
    assert all(s is d.unet for s, d in zip(shared.unets, ddpms))


def test_unconditional_bad_inputs_and_incompatible_models():
    from diffusers import DDPMScheduler

    from superdiff.pipelines import SuperDiffUnconditionalPipeline
    from superdiff.testing import tiny_unconditional_components, tiny_unet2d

    comps = tiny_unconditional_components(num_models=2)
    pipe = SuperDiffUnconditionalPipeline(**comps)
    calls = [count_calls(u) for u in pipe.unets]
    for kwargs, argument in [
        (dict(mode="nand"), "mode"),
        (dict(log_weights=[1.0]), "log_weights"),
        (dict(num_inference_steps=-3), "num_inference_steps"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(batch_size=0), "batch_size"),
        (dict(generator=123), "generator"),
        (dict(num_inference_steps=5000), "num_inference_steps"),  # more than DDPM's 1000 training timesteps
    ]:
        with pytest.raises(ValueError, match=f"^{argument}="):
            pipe(progress=False, **kwargs)
    one = SuperDiffUnconditionalPipeline(comps["unets"][:1], comps["scheduler"])
    with pytest.raises(ValueError, match="^unets=.*at least 2"):
        one(mode="and", progress=False)
    assert all(c == [] for c in calls)
    with pytest.raises(ValueError, match=r"unets\[1\] samples .* \(3, 16\) but unets\[0\] samples \(3, 8\)"):
        SuperDiffUnconditionalPipeline([tiny_unet2d(), tiny_unet2d(sample_size=16)], comps["scheduler"])
    for unets, i in [
        ([tiny_unet2d(out_channels=5), tiny_unet2d()], 0),
        ([tiny_unet2d(), tiny_unet2d(out_channels=5)], 1),
    ]:
        with pytest.raises(ValueError, match=rf"^unets\[{i}\] has out_channels=5 for in_channels=3"):
            SuperDiffUnconditionalPipeline(unets, comps["scheduler"])
    with pytest.raises(ValueError, match="different noise process"):
        SuperDiffUnconditionalPipeline.check_schedulers(
            [DDPMScheduler(), DDPMScheduler(beta_schedule="squaredcos_cap_v2")]
        )
