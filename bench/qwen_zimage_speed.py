"""SuperDiff AND of 2 prompts on Qwen-Image and Z-Image against diffusers' own pipeline with one prompt, same
model, equal steps.

For each family one diffusers pipeline (``QwenImagePipeline``, ``ZImagePipeline``) is built from seeded random
components of that family's shapes (superdiff.testing's tiny builders, wider); the superdiff adapter wraps the
very same modules with ``from_pipe``. Both run the same size, steps and starting seed, latents out (no VAE
decode), unguided and guided:

* **Qwen-Image unguided** (no negative prompt): diffusers calls the transformer on B rows per step, ours on
  M·B, a bound of M = 2 (``evaluation_bound_qwenimage``). **True CFG** (``true_cfg_scale`` 4 with a negative
  prompt): diffusers makes two calls of B rows per step, ours one of (M+1)·B, a bound of (M+1)/2 = 1.5.
* **Z-Image-Turbo** (``guidance_scale`` 0): B rows against M·B, a bound of 2. **Guided** (``guidance_scale``
  5): diffusers makes one call of 2B rows, ours one of (M+1)·B, a bound of 1.5.

Ratios are medians of per-round ratios (the two pipelines of a mode back to back in each round), reported, not
asserted; ``transformer_ratio_*`` times the transformer alone in the same runs (as in ``flux_speed.py``), to
show whether a gap above the bound is the network's own scaling with rows or the work around it. CPU runs use
one intra-op thread unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import statistics

import torch

from common import emit, interleaved_times, machine, median_ratio, transformer_bench_args
from flux_speed import TransformerClock, clocked

M = 2  # prompts composed with AND
PROMPTS = ["a photo of a cat", "a photo of a dog"]
JOINT_PROMPT = "a photo of a cat and a dog"  # what a diffusers user would type instead
NEGATIVE = "a blurry photo"
TRUE_CFG = 4.0  # QwenImagePipeline's default
Z_GUIDANCE = 5.0  # ZImagePipeline's default

#: Transformer configs. "tiny": CPU-sized (2 blocks of width 256), so most of a run is spent in the network;
#: "small": fewer, narrower blocks for GPUs (8 blocks of width 1024; Qwen-Image has 60 of 3072, Z-Image 30 of
#: 3840). ``width`` is also the text encoder's hidden size (Qwen-Image's joint_attention_dim, Z-Image's
#: cap_feat_dim). Both take 16 latent channels (Qwen-Image packs them 2×2 into 64), as the real models do.
SIZES = {
    "tiny": dict(layers=2, heads=4, head_dim=64, width=64, axes=(16, 24, 24)),
    "small": dict(layers=8, heads=8, head_dim=128, width=1024, axes=(32, 48, 48)),
}


def build(family: str, size: str, device: str, dtype: torch.dtype, seed: int = 0):
    """diffusers' pipeline of ``family`` ("qwenimage" or "zimage") on seeded random components of ``SIZES[size]``
    with a VAE of factor 8 (unused with latent output) and the family's scheduler config."""
    from diffusers import (
        AutoencoderKLQwenImage,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from diffusers.utils import logging

    from superdiff.testing import (
        tiny_qwen3,
        tiny_qwen25_vl,
        tiny_qwen_tokenizer,
        tiny_qwenimage_components,
        tiny_vae,
        tiny_zimage_components,
    )

    logging.set_verbosity_error()  # no notes about casting random modules with .to(dtype)
    cfg, tokenizer = SIZES[size], tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    if family == "qwenimage":
        transformer = QwenImageTransformer2DModel(
            in_channels=64, out_channels=16, num_layers=cfg["layers"], attention_head_dim=cfg["head_dim"],
            num_attention_heads=cfg["heads"], joint_attention_dim=cfg["width"], axes_dims_rope=cfg["axes"]).eval()
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
        return QwenImagePipeline(
            scheduler=tiny_qwenimage_components(seed)["scheduler"], vae=vae, tokenizer=tokenizer,
            text_encoder=tiny_qwen25_vl(tokenizer, cfg["width"], seed), transformer=transformer,
        ).to(device=device, dtype=dtype)
    transformer = ZImageTransformer2DModel(
        in_channels=16, dim=cfg["heads"] * cfg["head_dim"], n_layers=cfg["layers"], n_refiner_layers=1,
        n_heads=cfg["heads"], n_kv_heads=cfg["heads"], cap_feat_dim=cfg["width"], axes_dims=list(cfg["axes"]),
        axes_lens=[1024, 512, 512]).eval()
    with torch.no_grad():  # set, as torch.empty leaves them
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    down, up = ("DownEncoderBlock2D",) * 4, ("UpDecoderBlock2D",) * 4
    return ZImagePipeline(
        scheduler=tiny_zimage_components(seed)["scheduler"], tokenizer=tokenizer, transformer=transformer,
        vae=tiny_vae(16, seed, block_out_channels=(8,) * 4, down_block_types=down, up_block_types=up),
        text_encoder=tiny_qwen3(tokenizer, cfg["width"], seed),
    ).to(device=device, dtype=dtype)


#: Per family: (mode, diffusers' and superdiff's extra arguments, evaluation bound, goal).
MODES = {
    "qwenimage": [("unguided", dict(true_cfg_scale=1.0), M, 2.1),
                  ("true_cfg", dict(true_cfg_scale=TRUE_CFG, negative_prompt=NEGATIVE), (M + 1) / 2, 1.6)],
    "zimage": [("turbo", dict(guidance_scale=0.0), M, 2.1),
               ("cfg", dict(guidance_scale=Z_GUIDANCE, negative_prompt=NEGATIVE), (M + 1) / 2, 1.6)],
}


def runners(family: str, pipe, steps: int, batch: int, latent: int, device: str) -> dict:
    """The calls of ``MODES[family]``, each by diffusers and by superdiff: same model, steps, batch, size and
    starting seed; latents out."""
    from superdiff.pipelines import superdiff_class_of

    ours = superdiff_class_of(pipe).from_pipe(pipe)
    pipe.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    assert ours.transformer is pipe.transformer and ours.text_encoder is pipe.text_encoder
    pixels = latent * pipe.vae_scale_factor
    common = dict(num_inference_steps=steps, num_images_per_prompt=batch, height=pixels, width=pixels,
                  output_type="latent", max_sequence_length=64)
    fns = {}
    for mode, extra, _, _ in MODES[family]:
        fns[f"diffusers_{mode}"] = lambda extra=extra: pipe(
            JOINT_PROMPT, generator=torch.Generator(device).manual_seed(0), **common, **extra).images
        fns[f"superdiff_{mode}"] = lambda extra=extra: ours(
            prompts=PROMPTS, mode="and", generator=torch.Generator(device).manual_seed(0), progress=False, **common,
            **extra).images
    return fns


def main() -> None:
    args = transformer_bench_args(__doc__, SIZES, steps=20)
    result = {"benchmark": "qwen_zimage_speed", "machine": machine(), "device": args.device, "dtype": str(args.dtype),
              "quick": args.quick, "size": args.size, "latent": [16, args.latent, args.latent],
              "image_tokens": (args.latent // 2) ** 2, "steps": args.steps, "batch": args.batch,
              "repeats": args.repeats, "prompts": M}
    for family, modes in MODES.items():
        pipe = build(family, args.size, args.device, args.dtype)
        result[f"params_{family}"] = sum(q.numel() for q in pipe.transformer.parameters())
        fns = runners(family, pipe, args.steps, args.batch, args.latent, args.device)
        clock, spent = TransformerClock(pipe.transformer, args.device), {name: [] for name in fns}
        with torch.inference_mode():
            rounds = interleaved_times(clocked(fns, clock, spent), args.repeats, args.device, warmup=1)
        clock.remove()
        for mode, _, bound, goal in modes:
            ours, theirs, key = f"superdiff_{mode}", f"diffusers_{mode}", f"{family}_{mode}"
            result |= {
                f"seconds_per_image_diffusers_{key}": round(statistics.median(rounds[theirs]) / args.batch, 4),
                f"seconds_per_image_superdiff_{key}": round(statistics.median(rounds[ours]) / args.batch, 4),
                f"ratio_{key}": round(median_ratio(rounds[ours], rounds[theirs]), 3),
                f"ratio_mean_{key}": round(statistics.mean(ratios := [a / b for a, b in zip(rounds[ours],
                                                                                          rounds[theirs])]), 3),
                f"ratio_range_{key}": [round(min(ratios), 3), round(max(ratios), 3)],
                f"evaluation_bound_{key}": bound,
                f"goal_{key}": goal,
                f"transformer_ratio_{key}": round(median_ratio(spent[ours][1:], spent[theirs][1:]), 3),
            }
    if not args.json:
        print(f"{args.size} transformers ({result['params_qwenimage'] / 1e6:.1f}M Qwen-Image, "
              f"{result['params_zimage'] / 1e6:.1f}M Z-Image parameters), {result['image_tokens']} image tokens, "
              f"{args.steps} steps, batch {args.batch}, medians of {args.repeats} rounds, {args.device}\n")
        print("| family | mode | diffusers s/image | superdiff s/image | ratio (median) | mean | range | transformer "
              "ratio | evaluation bound | goal |\n|---|---|---|---|---|---|---|---|---|---|")
        for family, modes in MODES.items():
            for mode, _, bound, goal in modes:
                key = f"{family}_{mode}"
                print(f"| {family} | {mode} | {result[f'seconds_per_image_diffusers_{key}']} | "
                      f"{result[f'seconds_per_image_superdiff_{key}']} | {result[f'ratio_{key}']} | "
                      f"{result[f'ratio_mean_{key}']} | {'–'.join(map(str, result[f'ratio_range_{key}']))} | "
                      f"{result[f'transformer_ratio_{key}']} | {bound:g} | ≤ {goal} |")
    if args.json:
        emit(result, True)


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("qwen_zimage_speed"):
        main()
