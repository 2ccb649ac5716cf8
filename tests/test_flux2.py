"""SuperDiffFlux2Pipeline (FLUX.2 dev: Mistral-3, guidance-distilled) and SuperDiffFlux2KleinPipeline (FLUX.2
klein: Qwen3, true classifier-free guidance) on tiny seeded components (CPU, offline): κ and log-density traces
against the independent loop of pipeline_reference.py on diffusers' own text encoding, latents, position ids
and σ grid; one batched transformer call per step; sizes and latents; loading, from_pipe and
`superdiff generate --model <folder>`; expressions and particles."""

from __future__ import annotations

import json

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

PROMPTS3 = ["a red circle", "a blue square", "a green cross"]
GUIDANCE = 4.0  # dev: the distilled embedding; klein: classifier-free guidance (both diffusers' default)
SIZE = 16  # pixels: VAE factor 2 → 8×8 latents → 4×4 patches of 4·4 channels
LENGTH = 48  # text tokens: the system prompt (dev) and chat template fit, with the prompt
KW = dict(height=SIZE, width=SIZE, max_sequence_length=LENGTH, progress=False)
FAMILIES = ("dev", "klein")


def pipes(family: str, **config):
    """(ours, diffusers' own pipeline) on the same tiny components."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    from superdiff.pipelines import SuperDiffFlux2KleinPipeline, SuperDiffFlux2Pipeline
    from superdiff.testing import tiny_flux2_components

    comps = tiny_flux2_components(klein=family == "klein")
    if family == "dev":
        return SuperDiffFlux2Pipeline(**comps), Flux2Pipeline(**comps)
    return SuperDiffFlux2KleinPipeline(**comps, **config), Flux2KleinPipeline(**comps, **config)


@pytest.mark.parametrize("family, mode, guided, m", [
    ("dev", "and", False, 2), ("dev", "or", False, 2), ("dev", "and", False, 3), ("dev", "or", False, 3),
    ("klein", "and", False, 2), ("klein", "and", True, 2), ("klein", "or", True, 2), ("klein", "and", True, 3),
    ("klein", "or", False, 3),
])
def test_traces_match_independent_loop(family, mode, guided, m):
    """κ and log-density traces equal the reference loop's, which calls the transformer once per prompt (and
    once for the empty prompt under klein's guidance) on diffusers' own encode_prompt, prepare_latents (draw,
    packing and position ids), σ grid and unpacking; dev's rows carry the distilled guidance."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps

    ours, theirs = pipes(family)
    ours.to(torch.float64)  # the shared modules: theirs too
    prompts, scale = PROMPTS3[:m], (GUIDANCE if guided or family == "dev" else 1.0)
    out, states = run_with_states(ours, prompts, mode=mode, num_inference_steps=STEPS, guidance_scale=scale,
                                  num_images_per_prompt=2, generator=seeded(6), output_type="latent", **KW)
    mu = compute_empirical_mu(16, STEPS)  # 4×4 image tokens
    retrieve_timesteps(theirs.scheduler, STEPS, "cpu", sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    sigmas = [float(s) for s in theirs.scheduler.sigmas.double()]
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == STEPS + 1
    torch.testing.assert_close(out.timesteps, torch.tensor(sigmas[:-1], dtype=torch.float64) * 1000)
    grid = [(1.0 - s, s) for s in sigmas]  # x_t = (1 − t) x₀ + t ε, t = σ
    with torch.no_grad():
        conds = [theirs.encode_prompt(p, device="cpu", max_sequence_length=LENGTH) for p in prompts + [""]]
        g = seeded(6)  # diffusers' draw, packed with its position ids
        start, latent_ids = theirs.prepare_latents(2, 4, SIZE, SIZE, torch.float32, "cpu", g)
        assert start.shape == (2, 16, 16)  # (B, tokens, 4C)

        def unpack(tokens):
            return theirs._unpack_latents_with_ids(tokens, latent_ids)

        def x0(x, i, k):  # velocity u = ε − x₀  ⇒  x̂₀ = x − t u; k = m is the empty prompt
            b = x.shape[0]
            embeds, text_ids = conds[k]
            u = theirs.transformer(
                hidden_states=theirs._pack_latents(x), timestep=torch.full((b,), sigmas[i], dtype=torch.float64),
                guidance=torch.full((b,), GUIDANCE, dtype=torch.float64) if family == "dev" else None,
                encoder_hidden_states=embeds.expand(b, -1, -1), txt_ids=text_ids, img_ids=latent_ids,
                return_dict=False,
            )[0]
            return x - sigmas[i] * unpack(u)

        w = GUIDANCE if guided else None
        x, *traces = reference_loop(PerConditionDenoiser(x0, m), grid, unpack(start).double(), g, mode, w,
                                    states=states)
        if family == "dev":  # Flux2Pipeline's latent output: the packed tokens
            final = theirs._pack_latents(x)
        else:  # Flux2KleinPipeline's: the VAE latents, batch-norm statistics applied, unpatchified
            bn = theirs.vae.bn
            final = theirs._unpatchify_latents(x * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-4)
                                               + bn.running_mean.view(1, -1, 1, 1))
    assert out.kappa_trace.shape == (STEPS, 2, m)
    assert_traces_match(out, final, *traces, out.images, rtol=1e-8)


@pytest.mark.parametrize("family, guidance, rows", [
    ("dev", 2.5, 2), ("klein", GUIDANCE, 3), ("klein", 1.0, 2), ("klein-distilled", GUIDANCE, 2),
])
def test_one_batched_transformer_call_per_step(family, guidance, rows):
    """All prompts of a step (and klein's empty prompt under guidance) in ONE call; dev's rows carry the
    distilled guidance, klein's none; a step-distilled klein ignores guidance_scale, as diffusers does."""
    ours, _ = pipes("klein", is_distilled=True) if family == "klein-distilled" else pipes(family)
    seen = []

    def record(module, args, kwargs):
        seen.append(((args[0] if args else kwargs["hidden_states"]).shape[0], kwargs.get("guidance")))

    ours.transformer.register_forward_pre_hook(record, with_kwargs=True)
    out = ours(PROMPTS3[:2], num_inference_steps=STEPS, num_images_per_prompt=3, guidance_scale=guidance,
               output_type="latent", generator=seeded(1), **KW)
    assert [r for r, _ in seen] == [rows * 3] * STEPS
    assert rows == 2 + type(ours).guides(guidance, None, config=ours.config)  # the command line counts rows by it
    for _, g in seen:
        assert g is None if family != "dev" else torch.equal(g, torch.full_like(g, guidance))
    assert out.images.shape == ((3, 16, 16) if family == "dev" else (3, 4, 8, 8))
    assert ours.guidance_scale == (None if family == "klein-distilled" else guidance)  # as diffusers reports it


@pytest.mark.parametrize("family", FAMILIES)
def test_no_nan_from_sigma_one_in_every_mode(family):
    ours, _ = pipes(family)
    kw = dict(num_inference_steps=3, num_images_per_prompt=2, output_type="np", **KW)
    for mode, scale in [("and", 1.0), ("or", 1.0), ("average", 1.0), ("sum", GUIDANCE), ("and", GUIDANCE)]:
        if family == "dev" and mode == "sum":
            continue  # no classifier-free guidance: sum has no denoised form at σ = 1 (refused, below)
        out = ours(PROMPTS3[:2], mode=mode, guidance_scale=scale, generator=seeded(0), **kw)
        assert float(out.timesteps[0]) == 1000.0  # σ = 1, α = 0
        assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all()
        assert torch.isfinite(out.log_density_trace).all() and torch.isfinite(out.kappa_trace).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_sizes_and_latents_as_diffusers_takes_them(family):
    """Multiples of 2 × the VAE factor are sampled (square or not) as diffusers does; other sizes are refused
    before any network call, naming the size diffusers would round down to; latents= is diffusers' layout
    (B, 4C, h/2, w/2), used as given, and the generator's own draw is diffusers' prepare_latents draw."""
    ours, theirs = pipes(family)
    networks = [ours.transformer, ours.text_encoder, ours.vae]
    calls = [count_calls(n) for n in networks]
    for side in (18, 15, 6):
        rounded = max(4, 2 * (side // (theirs.vae_scale_factor * 2)) * theirs.vae_scale_factor)
        with pytest.raises(ValueError, match=rf"^height={side} is not valid: must be a positive multiple of 4.*e\.g\. "
                                             rf"{rounded}$"):
            ours(PROMPTS3[:2], **(KW | dict(height=side)))
    with pytest.raises(ValueError, match=r"^latents=<a tensor of shape \(1, 16, 16\)> .* shape \(1, 16, 4, 4\)"):
        ours(PROMPTS3[:2], latents=torch.randn(1, 16, 16), **KW)
    assert all(c == [] for c in calls)
    g = seeded(5)
    drawn, _ = theirs.prepare_latents(2, 4, SIZE, SIZE, torch.float32, "cpu", g)
    z = drawn.transpose(1, 2).reshape(2, 16, 4, 4)
    kw = dict(num_inference_steps=3, num_images_per_prompt=2, output_type="latent", guidance_scale=GUIDANCE, **KW)
    given = ours(PROMPTS3[:2], latents=z, generator=g, **kw)  # g continues: it drives the steps' noise
    own = ours(PROMPTS3[:2], generator=seeded(5), **kw)
    torch.testing.assert_close(given.images, own.images, rtol=0, atol=0)
    torch.testing.assert_close(given.kappa_trace, own.kappa_trace, rtol=0, atol=0)
    wide = ours(PROMPTS3[:2], **(kw | dict(height=8, width=24, output_type="np")))
    assert wide.images.shape == (2, 8, 24, 3)
    theirs.set_progress_bar_config(disable=True)
    assert theirs(prompt="a red circle", height=8, width=24, num_inference_steps=2, max_sequence_length=LENGTH,
                  output_type="np").images.shape == (1, 8, 24, 3)


BAD = {
    "dev": [
        (dict(negative_prompt="a cat"), "negative_prompt='a cat' is not valid: FLUX.2 dev is guidance-distilled"),
        (dict(guidance_scale=None), "guidance_scale=None is not valid: .*guidance is one of its inputs"),
        (dict(guidance_scale=-2.0), "guidance_scale=-2.0"),
        (dict(mode="sum"), r"the combiner's weights \(1.0, 1.0\) sum to 2: without guidance.*\(FLUX.2 dev has none\)"),
        (dict(max_sequence_length=513), "max_sequence_length=513"),
        (dict(width=10), "width=10 .*e.g. 8$"),
        (dict(prompt_embeds=torch.zeros(1, 8, 48)), "prompt_embeds="),
    ],
    "klein": [
        (dict(negative_prompt="a cat", guidance_scale=1.0), "negative_prompt=.*guidance_scale=1.0 turns off"),
        (dict(guidance_scale=float("nan")), "guidance_scale=nan"),
        (dict(mode="sum", guidance_scale=1.0),
         r"the combiner's weights \(1.0, 1.0\) sum to 2: without guidance.*above 1 \(e.g. 4.0; it is 1.0\)$"),
        (dict(max_sequence_length=0), "max_sequence_length=0"),
        (dict(height=22), "height=22 .*e.g. 20$"),
        (dict(prompts=["a cat"]), "prompts="),
    ],
}


@pytest.mark.parametrize("family, bad, message", [(f, b, m) for f in FAMILIES for b, m in BAD[f]])
def test_bad_arguments_are_refused_before_any_network_call(family, bad, message):
    ours, _ = pipes(family)
    calls = [count_calls(n) for n in (ours.transformer, ours.text_encoder)]
    with pytest.raises(ValueError, match=f"^{message}"):
        ours(**(dict(prompts=PROMPTS3[:2]) | KW | bad))
    assert all(c == [] for c in calls)


@pytest.mark.parametrize("family", FAMILIES)
def test_loading_from_pipe_and_compose(family, tmp_path):
    """A saved Flux2Pipeline / Flux2KleinPipeline folder is read as its family (pipeline_class_for,
    from_pretrained with local_files_only; the other family's class refuses it); from_pipe and compose share
    the modules; the round trip samples the same images; klein's is_distilled survives it."""
    import superdiff
    from superdiff.pipelines import SuperDiffFlux2KleinPipeline, SuperDiffFlux2Pipeline, pipeline_class_for

    ours, theirs = pipes(family)
    cls, other = ((SuperDiffFlux2Pipeline, SuperDiffFlux2KleinPipeline) if family == "dev"
                  else (SuperDiffFlux2KleinPipeline, SuperDiffFlux2Pipeline))
    theirs.save_pretrained(tmp_path / "model")
    assert pipeline_class_for(tmp_path / "model") is cls
    refused = f"is a {type(theirs).__name__} .*{other.__name__} cannot load.*{cls.__name__}"
    with pytest.raises(ValueError, match=refused):
        other.from_pretrained(tmp_path / "model", local_files_only=True)
    kw = dict(num_inference_steps=2, output_type="np", guidance_scale=GUIDANCE, **KW)
    expected = ours(PROMPTS3[:2], generator=seeded(0), **kw).images
    loaded = cls.from_pretrained(tmp_path / "model", local_files_only=True)
    np.testing.assert_allclose(expected, loaded(PROMPTS3[:2], generator=seeded(0), **kw).images, atol=1e-6)
    shared = cls.from_pipe(theirs)
    assert type(shared) is cls and shared.transformer is theirs.transformer
    assert shared.text_encoder is theirs.text_encoder
    np.testing.assert_array_equal(expected, superdiff.compose(theirs, PROMPTS3[:2], generator=seeded(0), **kw).images)
    if family == "klein":
        from diffusers import Flux2KleinPipeline

        Flux2KleinPipeline.from_pipe(theirs, is_distilled=True).save_pretrained(tmp_path / "distilled")
        distilled = cls.from_pretrained(tmp_path / "distilled", local_files_only=True)
        assert distilled.config.is_distilled and cls.from_pipe(theirs, is_distilled=True).config.is_distilled
        rows = []
        distilled.transformer.register_forward_pre_hook(lambda mod, a, k: rows.append(a[0].shape[0]),
                                                        with_kwargs=True)
        distilled(PROMPTS3[:2], generator=seeded(0), **kw)
        assert rows == [2, 2]  # guidance_scale 4 ignored: no unconditional row


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_composes_on_a_saved_folder(family, tmp_path):
    """`superdiff generate --model <folder>`: read from model_index.json, sampled with diffusers' default
    guidance (4), images and sidecars naming the adapter written."""
    from click.testing import CliRunner

    from superdiff_cli.main import cli

    _, theirs = pipes(family)
    theirs.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, [
        "generate", "--model", str(tmp_path / "model"), "--and", "a red circle", "--and", "a blue square", "--steps",
        "2", "--num-images", "2", "--height", "16", "--width", "16", "--dtype", "float32", "--out", str(out),
        "--quiet",
    ])
    assert r.exit_code == 0, r.output
    side = json.loads((out / "image_001.json").read_text())
    name = "SuperDiffFlux2Pipeline" if family == "dev" else "SuperDiffFlux2KleinPipeline"
    assert side["pipeline"] == name and side["guidance"] == GUIDANCE and side["mode"] == "and"
    assert len(side["kappa_trace"]) == 2 and (out / "image_000.png").exists() and (out / "grid.png").exists()
    refused = CliRunner().invoke(cli, ["generate", "--model", str(tmp_path / "model"), "--and", "a", "--and", "b",
                                       "--height", "18", "--out", str(tmp_path / "refused"), "--quiet"])
    # the 2×2 packing, read from the folder before loading it: multiples of 4 with the tiny VAE's factor 2
    assert refused.exit_code == 2 and "--height 18 is not a multiple of 4" in refused.output, refused.output
    assert "use e.g. --height 16" in refused.output and not (tmp_path / "refused").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_expressions_and_particles(family):
    """An And of two leaves is mode="and" to the bit; a corrected soft-min on particles returns one image per
    prompt set with finite weights, and image k of a list of generators is the single-image call with [generator k]."""
    pipe, _ = pipes(family)
    common = dict(KW, guidance_scale=GUIDANCE, num_inference_steps=STEPS, output_type="latent")
    flat = pipe(prompts=PROMPTS3[:2], mode="and", generator=seeded(3), **common)
    tree = pipe(expression=f'"{PROMPTS3[0]}" & "{PROMPTS3[1]}"', generator=seeded(3), **common)
    assert torch.equal(flat.images, tree.images) and torch.equal(flat.kappa_trace, tree.kappa_trace)
    if family == "klein":  # the unconditional row is the negative prompt where one is given ("" otherwise)
        steered = pipe(prompts=PROMPTS3[:2], mode="and", generator=seeded(3), negative_prompt="a cat", **common)
        empty = pipe(prompts=PROMPTS3[:2], mode="and", generator=seeded(3), negative_prompt="", **common)
        assert torch.equal(empty.images, flat.images) and not torch.equal(steered.images, flat.images)
    text = f'softmin("{PROMPTS3[0]}", "{PROMPTS3[1]}")[sharpness=4]'  # degree 1, corrected: weighted particles
    both = pipe(expression=text, particles=3, num_images_per_prompt=2, generator=[seeded(5), seeded(6)], **common)
    assert both.images.shape[0] == 2 and torch.isfinite(both.images).all()
    assert torch.isfinite(both.log_weights).all() and (both.log_weights <= 1e-9).all()
    second = pipe(expression=text, particles=3, generator=[seeded(6)], **common)
    assert torch.allclose(both.images[1], second.images[0], atol=1e-5)
