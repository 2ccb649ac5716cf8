"""SuperDiff's own cost: AND / OR sampling against the same sampler with fixed κ (same network calls).

Both runs call the same batched denoiser the same number of times; the difference is the
combiner (softmax, or the per-sample AND solve) and its linear system. Goal: ratio ≤ 1.05. The
ratios are medians of per-round ratios (the three samplers run back to back in each round).
"""

from __future__ import annotations

import statistics

import torch

from common import emit, interleaved_times, machine, median_ratio, parser, sd_denoiser
from superdiff import And, Fixed, Or, prior_sample, sample_sde


def main() -> None:
    args = parser(__doc__).parse_args()
    size = "tiny" if (args.quick or args.device == "cpu") else "small"
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    steps = args.steps or (20 if args.quick else 50)
    batch = 2 if args.quick else 4
    repeats = args.repeats or 9
    denoiser, _, latent, params = sd_denoiser(size, 2, args.device, dtype)
    times = denoiser.process.time_grid(steps)

    def run(combiner):
        def go():
            x = prior_sample(denoiser, batch, latent, torch.Generator().manual_seed(0), args.device)
            sample_sde(denoiser, x, times, combiner, guidance_scale=7.5, generator=torch.Generator().manual_seed(1), final_denoise=True)
        return go

    with torch.inference_mode():
        timed = interleaved_times({"fixed": run(Fixed((0.5, 0.5))), "and": run(And()), "or": run(Or())}, repeats, args.device)
        fixed, t_and, t_or = (statistics.median(timed[k]) for k in ("fixed", "and", "or"))
    emit(
        {
            "benchmark": "overhead",
            "machine": machine(),
            "unet_parameters": params,
            "latent": list(latent),
            "steps": steps,
            "batch": batch,
            "dtype": str(dtype),
            "seconds_fixed": round(fixed, 4),
            "seconds_and": round(t_and, 4),
            "seconds_or": round(t_or, 4),
            "ratio": round(median_ratio(timed["and"], timed["fixed"]), 4),
            "ratio_or": round(median_ratio(timed["or"], timed["fixed"]), 4),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
