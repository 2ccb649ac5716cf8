"""SuperDiff AND of 2 prompts on FLUX.2 (dev and klein) against diffusers' own pipeline with one prompt,
same components, equal steps.

For each family one diffusers pipeline (``Flux2Pipeline``, ``Flux2KleinPipeline``) is built from seeded
random FLUX.2-shaped components (``superdiff.testing.tiny_flux2_components`` with a larger
transformer, ``SIZES``); the superdiff pipeline wraps the very same modules (``from_pipe``). Both run
the same size, steps, guidance 4 (diffusers' default) and starting seed, latents out (no VAE decode):

* **dev** (guidance-distilled): diffusers calls the transformer on B rows per step, ours on M·B rows
  (one per prompt), so the ratio of network evaluations is M = 2 (``evaluation_bound_dev``).
* **klein** (classifier-free guidance): diffusers makes two calls of B rows per step (prompt, then the
  empty prompt), ours one of (M+1)·B rows, a bound of (M+1)/2 = 1.5 (``evaluation_bound_klein``).

The ratios are medians of per-round ratios (the two pipelines of a family run back to back in each
round), with their mean and range; they are reported, not asserted. CPU runs use one intra-op thread
unless ``--threads`` says otherwise; ``--device cuda`` runs the "small" transformer in bfloat16.
"""

from __future__ import annotations

import statistics

import torch

from common import emit, interleaved_times, machine, median_ratio, transformer_bench_args

M = 2  # prompts composed with AND
PROMPTS = ["a photo of a cat", "a photo of a dog"]
JOINT_PROMPT = "a photo of a cat and a dog"  # what a diffusers user would type instead
GUIDANCE = 4.0  # dev: the distilled embedding; klein: classifier-free guidance (diffusers' defaults)

#: Flux2Transformer2DModel configs over the tiny components' 48-wide text input and 16 patchified
#: latent channels. "tiny": a CPU-sized transformer (2 double + 4 single blocks, width 256); "small":
#: fewer, narrower FLUX.2 blocks for GPUs (4 + 8 blocks of width 1024; FLUX.2 dev has 8 + 48 of width 6144).
SIZES = {
    "tiny": dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
                 axes_dims_rope=[16, 16, 16, 16]),
    "small": dict(num_layers=4, num_single_layers=8, attention_head_dim=128, num_attention_heads=8,
                  axes_dims_rope=[32, 32, 32, 32]),
}


def build(family: str, size: str, device: str, dtype: torch.dtype):
    """(diffusers' pipeline, ours on the same modules) of ``family`` ("dev" or "klein")."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline
    from diffusers.utils import logging

    from superdiff.pipelines import SuperDiffBasePipeline
    from superdiff.testing import tiny_flux2_components

    logging.set_verbosity_error()  # no notes about casting random modules with .to(dtype)
    components = tiny_flux2_components(klein=family == "klein", **SIZES[size])
    pipe = (Flux2KleinPipeline if family == "klein" else Flux2Pipeline)(**components).to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    ours = SuperDiffBasePipeline.from_pipe(pipe)
    assert ours.transformer is pipe.transformer
    return pipe, ours


def runners(pipe, ours, steps: int, batch: int, latent: int, text_tokens: int, device: str) -> dict:
    """diffusers with the joint prompt, ours composing the two; same steps, batch, size, guidance, seed."""
    common = dict(num_inference_steps=steps, num_images_per_prompt=batch, height=latent * pipe.vae_scale_factor,
                  width=latent * pipe.vae_scale_factor, output_type="latent", guidance_scale=GUIDANCE,
                  max_sequence_length=text_tokens)
    return {
        "diffusers": lambda: pipe(prompt=JOINT_PROMPT, generator=torch.Generator(device).manual_seed(0),
                                  **common).images,
        "superdiff": lambda: ours(prompts=PROMPTS, mode="and", generator=torch.Generator(device).manual_seed(0),
                                  progress=False, **common).images,
    }


def main() -> None:
    args = transformer_bench_args(__doc__, SIZES, steps=28, text_tokens=(512, 64))  # 512: diffusers' text length
    result = {"benchmark": "flux2_speed", "machine": machine(), "device": args.device, "dtype": str(args.dtype),
              "quick": args.quick, "size": args.size, "latent": args.latent, "image_tokens": (args.latent // 2) ** 2,
              "text_tokens": args.text_tokens, "steps": args.steps, "batch": args.batch, "repeats": args.repeats,
              "prompts": M, "guidance_scale": GUIDANCE}
    for family, bound in (("dev", M), ("klein", (M + 1) / 2)):
        pipe, ours = build(family, args.size, args.device, args.dtype)
        fns = runners(pipe, ours, args.steps, args.batch, args.latent, args.text_tokens, args.device)
        with torch.inference_mode():
            rounds = interleaved_times(fns, args.repeats, args.device, warmup=1)
        ratios = [ours / theirs for ours, theirs in zip(rounds["superdiff"], rounds["diffusers"])]
        result |= {
            f"params_{family}": sum(q.numel() for q in pipe.transformer.parameters()),
            f"seconds_per_image_diffusers_{family}": round(statistics.median(rounds["diffusers"]) / args.batch, 4),
            f"seconds_per_image_superdiff_{family}": round(statistics.median(rounds["superdiff"]) / args.batch, 4),
            f"ratio_{family}": round(median_ratio(rounds["superdiff"], rounds["diffusers"]), 3),
            f"ratio_{family}_mean": round(statistics.mean(ratios), 3),
            f"ratio_{family}_range": [round(min(ratios), 3), round(max(ratios), 3)],
            f"evaluation_bound_{family}": bound,
        }
    if not args.json:
        print("| family | diffusers s/image | superdiff s/image | ratio: median (mean, range) | evaluation bound |\n"
              "|---|---|---|---|---|")
        for f in ("dev", "klein"):
            r = {key[: -len(f) - 1]: value for key, value in result.items() if key.endswith(f"_{f}")}
            low, high = result[f"ratio_{f}_range"]
            print(f"| {f} | {r['seconds_per_image_diffusers']} | {r['seconds_per_image_superdiff']} | "
                  f"{r['ratio']} ({result[f'ratio_{f}_mean']}, {low}–{high}) | {r['evaluation_bound']} |")
        print()
    emit(result, args.json)


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("flux2_speed"):
        main()
