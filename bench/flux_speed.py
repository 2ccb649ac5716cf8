"""SuperDiff AND of 2 prompts on FLUX.1 against diffusers' ``FluxPipeline`` with one prompt, same model, equal steps.

One diffusers ``FluxPipeline`` is built from seeded random FLUX-shaped components (a guidance-distilled
``FluxTransformer2DModel``, as FLUX.1-dev's, CLIP + T5 encoders, FLUX.1's dynamically shifted
scheduler); ``SuperDiffFluxPipeline.from_pipe`` wraps the very same modules. Both run the same size,
steps, distilled guidance embedding and starting seed, latents out (no VAE decode), in two modes:

* **distilled** (no negative prompt): diffusers calls the transformer on B rows per step, ours on
  M·B rows (one per prompt), so the ratio of network evaluations is M = 2
  (``evaluation_bound_distilled``). Goal: ``ratio_distilled`` ≤ 2.1.
* **true CFG** (``true_cfg_scale`` > 1 with a ``negative_prompt``): diffusers makes two calls of B
  rows per step (prompt, then negative prompt), ours one of (M+1)·B rows, a bound of
  (M+1)/2 = 1.5 (``evaluation_bound_true_cfg``). Goal: ``ratio_true_cfg`` ≤ 1.6.

The ratios are medians of per-round ratios (the two pipelines of a mode run back to back in each
round); they are reported, not asserted. The ``transformer_*`` keys time the transformer alone, in
the same timed runs (forward hooks; CUDA events, no synchronisation), to show where a gap above the
bound comes from: the network's own scaling with rows, or the work around it. CPU runs use one
intra-op thread unless ``--threads`` says otherwise (see ``vs_diffusers.py``).
"""

from __future__ import annotations

import statistics

import torch

from common import clock_mark, emit, interleaved_times, machine, median_ratio, transformer_bench_args

M = 2  # prompts composed with AND
PROMPTS = ["a photo of a cat", "a photo of a dog"]
JOINT_PROMPT = "a photo of a cat and a dog"  # what a FluxPipeline user would type instead
NEGATIVE = "a blurry photo"
GUIDANCE = 3.5  # the distilled guidance embedding (FluxPipeline's default)
TRUE_CFG = 4.0

#: FluxTransformer2DModel configs. "tiny": a CPU-sized transformer (2 double + 4 single blocks, width
#: 256, 9.2M parameters), larger than the tests' (1 + 1 blocks, width 32) so that ~98% of a run is spent
#: in the network, not in Python; "small": fewer, narrower FLUX blocks for GPUs (4 + 8 blocks of width
#: 1024, 285M parameters; FLUX.1 itself has 19 + 38 of width 3072, 12B). ``in_channels`` is 4 × 16
#: latent channels packed 2×2, as FLUX.1's.
SIZES = {
    "tiny": dict(
        num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4, joint_attention_dim=64,
        pooled_projection_dim=64, axes_dims_rope=[16, 24, 24],
    ),
    "small": dict(
        num_layers=4, num_single_layers=8, attention_head_dim=128, num_attention_heads=8, joint_attention_dim=1024,
        pooled_projection_dim=768, axes_dims_rope=[16, 56, 56],
    ),
}


def build_pipe(size: str, device: str, dtype: torch.dtype, seed: int = 0):
    """A diffusers ``FluxPipeline`` of seeded random components, built as tests/test_pipelines_flux.py
    builds its tiny ones: the transformer of ``SIZES[size]`` (guidance-distilled, 16 latent channels),
    a CLIP text encoder whose pooled output has the transformer's ``pooled_projection_dim``, a one-layer
    T5 of width ``joint_attention_dim``, a tiny VAE with FLUX's scaling and shift factors (unused with
    latent output) and FLUX.1's scheduler config (dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.utils import logging

    from superdiff.testing import tiny_clip_text_model, tiny_clip_tokenizer, tiny_t5, tiny_vae

    logging.set_verbosity_error()  # no notes about casting random modules with .to(dtype)
    cfg = SIZES[size]
    tokenizer = tiny_clip_tokenizer()
    t5_tokenizer, t5 = tiny_t5(seed + 2, d_model=cfg["joint_attention_dim"])
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True, **cfg).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(latent_channels=16, seed=seed, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=tiny_clip_text_model(tokenizer, hidden_size=cfg["pooled_projection_dim"], seed=seed),
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def runners(pipe, steps: int, batch: int, latent: int, text_tokens: int, device: str) -> dict:
    """The four calls, same model, steps, batch, size, distilled guidance and starting seed; packed
    latents out (no VAE decode)."""
    from superdiff.pipelines import SuperDiffFluxPipeline

    ours = SuperDiffFluxPipeline.from_pipe(pipe)
    ours.set_progress_bar_config(disable=True)
    assert ours.transformer is pipe.transformer and ours.text_encoder_2 is pipe.text_encoder_2
    pixels = latent * pipe.vae_scale_factor
    common = dict(
        num_inference_steps=steps, num_images_per_prompt=batch, height=pixels, width=pixels, output_type="latent",
        guidance_scale=GUIDANCE, max_sequence_length=text_tokens,
    )
    cfg = dict(true_cfg_scale=TRUE_CFG, negative_prompt=NEGATIVE)

    def diffusers(**extra):
        return lambda: pipe(JOINT_PROMPT, generator=torch.Generator(device).manual_seed(0), **common, **extra).images

    def superdiff(**extra):
        return lambda: ours(prompts=PROMPTS, mode="and", generator=torch.Generator(device).manual_seed(0),
                            progress=False, **common, **extra).images

    return {
        "diffusers_distilled": diffusers(),
        "superdiff_distilled": superdiff(),
        "diffusers_true_cfg": diffusers(**cfg),
        "superdiff_true_cfg": superdiff(**cfg),
    }


class TransformerClock:
    """Forward hooks on the transformer that add up the time spent inside it, in the timed runs
    themselves: on CUDA the marks are events recorded in the stream (no synchronisation during a
    run, so the wall times are undisturbed), read when :meth:`take` is called after the run."""

    def __init__(self, module, device: str):
        self.cuda = device.startswith("cuda")
        self.starts: list = []
        self.ends: list = []
        self.hooks = [
            module.register_forward_pre_hook(lambda *_: self.starts.append(self._mark())),
            module.register_forward_hook(lambda *_: self.ends.append(self._mark())),
        ]

    def _mark(self):
        return clock_mark(self.cuda)

    def take(self) -> float:
        """Seconds inside the transformer since the last call; forget the marks."""
        if self.cuda:
            torch.cuda.synchronize()
        marks, self.starts, self.ends = zip(self.starts, self.ends), [], []
        return sum(start.elapsed_time(end) / 1000 if self.cuda else end - start for start, end in marks)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def clocked(fns: dict, clock: TransformerClock, spent: dict[str, list[float]]) -> dict:
    """``fns`` with each call's seconds inside the transformer appended to ``spent[name]``."""

    def wrap(name, fn):
        def run():
            out = fn()
            spent[name].append(clock.take())
            return out

        return run

    return {name: wrap(name, fn) for name, fn in fns.items()}


def main() -> None:
    args = transformer_bench_args(__doc__, SIZES, steps=28, text_tokens=(256, 32))  # 28: FluxPipeline's default

    pipe = build_pipe(args.size, args.device, args.dtype)
    params = sum(q.numel() for q in pipe.transformer.parameters())
    fns = runners(pipe, args.steps, args.batch, args.latent, args.text_tokens, args.device)
    clock, spent = TransformerClock(pipe.transformer, args.device), {name: [] for name in fns}
    with torch.inference_mode():
        rounds = interleaved_times(clocked(fns, clock, spent), args.repeats, args.device, warmup=1)
    clock.remove()
    per_image = {name: statistics.median(times) / args.batch for name, times in rounds.items()}
    in_net = {name: statistics.median(times[1:]) / args.batch for name, times in spent.items()}  # [0]: warm-up
    result = {
        "benchmark": "flux_speed",
        "machine": machine(),
        "device": args.device,
        "dtype": str(args.dtype),
        "quick": args.quick,
        "size": args.size,
        "params": params,
        "latent": [16, args.latent, args.latent],
        "image_tokens": (args.latent // 2) ** 2,
        "text_tokens": args.text_tokens,
        "steps": args.steps,
        "batch": args.batch,
        "repeats": args.repeats,
        "prompts": M,
        "guidance_scale": GUIDANCE,
        "true_cfg_scale": TRUE_CFG,
    }
    for mode, bound, goal in (("distilled", M, 2.1), ("true_cfg", (1 + M) / 2, 1.6)):
        ours, theirs = f"superdiff_{mode}", f"diffusers_{mode}"
        result |= {
            f"seconds_per_image_diffusers_{mode}": round(per_image[theirs], 4),
            f"seconds_per_image_superdiff_{mode}": round(per_image[ours], 4),
            f"ratio_{mode}": round(median_ratio(rounds[ours], rounds[theirs]), 3),
            f"evaluation_bound_{mode}": bound,
            f"goal_{mode}": goal,
            f"transformer_seconds_per_image_diffusers_{mode}": round(in_net[theirs], 4),
            f"transformer_seconds_per_image_superdiff_{mode}": round(in_net[ours], 4),
            f"transformer_ratio_{mode}": round(median_ratio(spent[ours][1:], spent[theirs][1:]), 3),
        }
    emit(result, args.json)


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("flux_speed"):
        main()
