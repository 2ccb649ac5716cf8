"""SuperDiff's own cost: AND / OR sampling against the same sampler with fixed κ (same network calls).

Both runs call the same batched denoiser the same number of times; the difference is the
combiner (softmax, or the per-sample AND solve) and its linear system. Goal: ratio ≤ 1.05. The
ratios are medians of per-round ratios (the three samplers run back to back in each round). On a
noisy machine that end-to-end ratio moves by several percent, so ``ratio_from_parts`` also
measures it from its parts: the fixed-κ run plus the extra time AND (OR) takes in the same sampler
with the network replaced by a cached output, which is short enough to time steadily.
"""

from __future__ import annotations

import statistics

import torch

from common import (
    NETWORK_FREE_RUNS,
    emit,
    interleaved_times,
    machine,
    median_ratio,
    network_free,
    parser,
    sampling_run,
    sd_denoiser,
)
from superdiff import And, Fixed, Or


def main() -> None:
    args = parser(__doc__).parse_args()
    size = "tiny" if (args.quick or args.device == "cpu") else "small"
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    steps = args.steps or (20 if args.quick else 50)
    batch = 2 if args.quick else 4
    repeats = args.repeats or 9
    denoiser, _, latent, params = sd_denoiser(size, 2, args.device, dtype)
    times = denoiser.process.time_grid(steps)

    combiners = {"fixed": Fixed((0.5, 0.5)), "and": And(), "or": Or()}
    with torch.inference_mode():
        runs = {
            k: sampling_run(denoiser, c, batch, latent, times, args.device, final_denoise=True)
            for k, c in combiners.items()
        }
        timed = interleaved_times(runs, repeats, args.device)
        fixed, t_and, t_or = (statistics.median(timed[k]) for k in ("fixed", "and", "or"))
        # The same comparison from its parts: the network-free samplers differ only by the
        # combiner's work; add that to the full run.
        cached = network_free(denoiser, batch, latent, times, args.device)
        parts = interleaved_times(
            {
                k: sampling_run(cached, c, batch, latent, times, args.device, NETWORK_FREE_RUNS, final_denoise=True)
                for k, c in combiners.items()
            },
            repeats,
            args.device,
        )
        extra = {
            k: (statistics.median(parts[k]) - statistics.median(parts["fixed"])) / NETWORK_FREE_RUNS
            for k in ("and", "or")
        }
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
            "ratio_from_parts": round(1 + extra["and"] / fixed, 4),
            "ratio_or_from_parts": round(1 + extra["or"] / fixed, 4),
        },
        args.json,
    )


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("overhead"):
        main()
