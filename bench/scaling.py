"""Cost per step as the number of prompts grows (M = 2, 4, 8), and the combiner's share of it.

Time per step should grow with the network's batch (M + 1 evaluations per image), while the
SuperDiff work (κ by AND, density updates, mixing, noise) stays under 2% of a step. That share is
measured by re-running the identical sampler with the network replaced by a cached output, the two
timed in interleaved rounds so that the machine's drift falls on both alike.
"""

from __future__ import annotations

import statistics

import torch

from common import NETWORK_FREE_RUNS, emit, interleaved_times, machine, median_ratio, network_free, parser, sampling_run, sd_denoiser
from superdiff import And


def main() -> None:
    args = parser(__doc__).parse_args()
    size = "tiny" if (args.quick or args.device == "cpu") else "small"
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    steps = args.steps or (10 if args.quick else 30)
    batch = 1 if args.quick else 2
    repeats = args.repeats or 5
    per_step, fractions = {}, {}
    for m in (2, 4, 8):
        denoiser, _, latent, params = sd_denoiser(size, m, args.device, dtype)
        times = denoiser.process.time_grid(steps)

        with torch.inference_mode():
            cached = network_free(denoiser, batch, latent, times, args.device)
            timed = interleaved_times({"full": sampling_run(denoiser, And(), batch, latent, times, args.device),
                                       "combine_only": sampling_run(cached, And(), batch, latent, times, args.device,
                                                                    NETWORK_FREE_RUNS)}, repeats, args.device)
        per_step[str(m)] = round(statistics.median(timed["full"]) / steps, 5)
        fractions[str(m)] = round(median_ratio(timed["combine_only"], timed["full"]) / NETWORK_FREE_RUNS, 4)
    emit(
        {
            "benchmark": "scaling",
            "machine": machine(),
            "unet_parameters": params,
            "latent": list(latent),
            "steps": steps,
            "batch": batch,
            "time_per_step": per_step,
            "combiner_fraction_by_m": fractions,
            "combiner_fraction": max(fractions.values()),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
