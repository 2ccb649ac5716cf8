"""Cost per step as the number of prompts grows (M = 2, 4, 8), and the combiner's share of it.

Time per step should grow with the network's batch (M + 1 evaluations per image), while the
SuperDiff work (κ by AND, density updates, mixing, noise) stays under 2% of a step. That share is
measured twice:

* ``combiner_fraction``: in place, inside the real runs: the time between one network call's end
  and the next one's start, over the time from the first call to the last (CUDA events on a GPU).
  It includes what the network leaves behind (cold caches, busy threads) for the work after it.
* ``combiner_fraction_isolated``: the identical sampler re-run with the network replaced by a
  cached output, timed in rounds interleaved with the real runs; the same work on a warm machine.

Both shares are also measured for ``density_variance="forward"`` (``*_forward_by_m``), in the same
rounds: the least work an AND step does, so a floor for the default's share on the same machine.
``bare_loop_fraction_by_m`` is the in-place share of a loop that only guides and takes a DDIM step (10
operations, no density), with the same network and timer: what any sampler pays per operation here.

``combiner_time_per_step`` is that work's own time per step: a network-free run of 2N steps less one of
N, each the least of at least 5 rounds, so the per-run set-up (planning, the output) cancels and a busy
machine's pauses do not enter; comparable across networks on one machine.

``operations_per_step`` counts the tensor operations (views excluded) that work issues per step:
on a GPU each is a kernel launch, which costs about the same whatever the latent size; with the
default ``density_variance="tweedie"`` AND solves a quadratic condition, and
``operations_per_step_forward`` is the same count with the common-variance ``"forward"``.
"""

from __future__ import annotations

import statistics

import torch

from common import (
    NETWORK_FREE_RUNS,
    NetworkCallTimer,
    emit,
    guided_ddim_run,
    interleaved_times,
    machine,
    median_ratio,
    network_free,
    operations_per_step,
    parser,
    sampling_run,
    sd_denoiser,
)
from superdiff import And

#: The estimators timed: the default (one variance per model) and the common-variance ``"forward"``, the
#: least work AND can do per step (its system stays linear), which bounds what any default can reach.
ESTIMATORS = {"": {}, "_forward": {"density_variance": "forward"}}


def main() -> None:
    args = parser(__doc__).parse_args()
    size = "tiny" if (args.quick or args.device == "cpu") else "small"
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    steps = args.steps or (10 if args.quick else 30)
    batch = 1 if args.quick else 2
    repeats = args.repeats or 5
    per_step, own_per_step, operations, operations_forward = {}, {}, {}, {}
    in_place: dict[str, dict[str, float]] = {suffix: {} for suffix in ESTIMATORS}
    isolated: dict[str, dict[str, float]] = {suffix: {} for suffix in ESTIMATORS}
    bare_loop, operations_bare = {}, {}
    for m in (2, 4, 8):
        denoiser, _, latent, params = sd_denoiser(size, m, args.device, dtype)
        times = denoiser.process.time_grid(steps)
        timer = NetworkCallTimer(denoiser, args.device)
        fractions: dict[str, list[float]] = {suffix: [] for suffix in [*ESTIMATORS, "_bare_loop"]}
        runs = {}

        def recording_share(run, out: list[float]):
            """``run``, then the share of it spent between network calls appended to ``out``."""

            def timed_run() -> None:
                run()
                out.append(timer.outside_fraction())

            return timed_run

        with torch.inference_mode():
            cached = network_free(denoiser, batch, latent, times, args.device)
            for suffix, options in ESTIMATORS.items():
                runs["full" + suffix] = recording_share(
                    sampling_run(timer, And(), batch, latent, times, args.device, **options), fractions[suffix])
                runs["combine_only" + suffix] = sampling_run(cached, And(), batch, latent, times, args.device,
                                                             NETWORK_FREE_RUNS, **options)
            runs["bare_loop"] = recording_share(guided_ddim_run(timer, batch, latent, times, args.device),
                                                fractions["_bare_loop"])
            timed = interleaved_times(runs, repeats, args.device)
            # The own time per step: a run of 2N steps less one of N (set-up cancels), each the least of its
            # rounds, which a busy machine's pauses do not reach.
            doubled = denoiser.process.time_grid(2 * steps)
            run_doubled = sampling_run(network_free(denoiser, batch, latent, doubled, args.device), And(), batch,
                                       latent, doubled, args.device, NETWORK_FREE_RUNS)
            own = interleaved_times({"single": runs["combine_only"], "doubled": run_doubled}, max(repeats, 5),
                                    args.device)
        per_step[str(m)] = round(statistics.median(timed["full"]) / steps, 5)
        own_per_step[str(m)] = round((min(own["doubled"]) - min(own["single"])) / NETWORK_FREE_RUNS / steps, 6)
        for suffix in ESTIMATORS:
            in_place[suffix][str(m)] = round(statistics.median(fractions[suffix][1:]), 4)  # [0]: the warm-up run
            isolated[suffix][str(m)] = round(median_ratio(timed["combine_only" + suffix], timed["full" + suffix])
                                             / NETWORK_FREE_RUNS, 4)
        bare_loop[str(m)] = round(statistics.median(fractions["_bare_loop"][1:]), 4)
        operations_bare[str(m)] = operations_per_step(denoiser, None, batch, latent, steps, args.device)
        operations[str(m)] = operations_per_step(denoiser, And(), batch, latent, steps, args.device)
        operations_forward[str(m)] = operations_per_step(denoiser, And(), batch, latent, steps, args.device,
                                                         density_variance="forward")
    emit(
        {
            "benchmark": "scaling",
            "machine": machine(),
            "unet_parameters": params,
            "latent": list(latent),
            "steps": steps,
            "batch": batch,
            "time_per_step": per_step,
            "combiner_time_per_step": own_per_step,
            "combiner_fraction_by_m": in_place[""],
            "combiner_fraction": max(in_place[""].values()),
            "combiner_fraction_isolated_by_m": isolated[""],
            "combiner_fraction_isolated": max(isolated[""].values()),
            "combiner_fraction_forward_by_m": in_place["_forward"],
            "combiner_fraction_isolated_forward_by_m": isolated["_forward"],
            "bare_loop_fraction_by_m": bare_loop,
            "operations_per_step": operations,
            "operations_per_step_forward": operations_forward,
            "operations_per_step_bare_loop": operations_bare,
        },
        args.json,
    )


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("scaling"):
        main()
