"""Our batched step against the authors' loop structure on the same SD-shaped model.

The reference calls the network once per prompt plus once unconditionally, in float32, then
combines (as ``clip_eval.py`` does); ours evaluates all M prompts and the unconditional branch in
one batched call. Both weigh by AND, the reference with one estimator variance for all models (the
authors' linear system), ours with the library's default, one variance per model (a quadratic
condition, more work per step): the ratio is the batching's gain net of that extra work.
Goal: speedup_vs_reference_loop ≥ 1.5 on CPU with the tiny model; it is the median of per-round
ratios (the two loops run back to back in each round), over 7 rounds. ``network_speedup`` is the
same ratio for the network calls alone (one batched call against M + 1 single ones, float32 both),
timed in the same rounds: what batching can give at most on the machine.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import torch

from common import emit, interleaved_times, machine, median_ratio, parser, sampling_run, sd_denoiser
from superdiff import And, prior_sample
from superdiff.combine import CombineInputs
from superdiff.density import ito_increment_system, ito_log_density_increment, transition_coefficients
from superdiff.sampling import mix_denoised


def _single_prompt_denoisers(denoiser) -> list:
    """One denoiser per prompt (and one for the unconditional), each calling the network on one row."""
    embeds = denoiser.conditions["encoder_hidden_states"]
    return [dataclasses.replace(denoiser, conditions={"encoder_hidden_states": embeds[j : j + 1]}, num_outputs=1,
                                unconditional=False)
            for j in range(embeds.shape[0])]


def reference_loop(denoiser, x, times, guidance_scale, generator):
    """One network call per prompt and one unconditional, per step (the authors' structure)."""
    p = denoiser.process
    singles = _single_prompt_denoisers(denoiser)
    m = len(singles) - 1
    log_q = torch.zeros(x.shape[0], m, dtype=torch.float64, device=x.device)
    combiner = And()
    for i in range(len(times) - 1):
        s, t = times[i], times[i + 1]
        c = transition_coefficients(
            float(p.alpha(s)), float(p.sigma(s)), float(p.alpha(t)), float(p.sigma(t)), "forward"
        )
        outs = [single(x, s)[0] for single in singles]
        denoised, uncond = torch.stack(outs[:m]), outs[m]
        noise = math.sqrt(c.var) * torch.randn(x.shape, generator=generator).to(x.device)
        a, b = ito_increment_system(denoised, uncond, guidance_scale, noise, c)
        kappa = combiner(CombineInputs(log_q, a, b, 1.0 / (len(times) - 1))).to(x.dtype)
        x0 = mix_denoised(denoised, kappa, x, c.alpha_s, guidance_scale, uncond)
        log_q = log_q + ito_log_density_increment(denoised, x0, x, noise, c)
        x = c.c_x * x + c.c_0 * x0 + noise
    return x


def main() -> None:
    args = parser(__doc__).parse_args()
    size = "tiny" if (args.quick or args.device == "cpu") else "small"
    steps = args.steps or (20 if args.quick else 50)
    batch = 1
    repeats = args.repeats or 7  # per-round ratios scatter by about ±0.1 on 2 CPU cores
    # the reference runs in float32, as the authors' code does; ours in the device's preferred dtype
    ours_dtype = torch.float32 if args.device == "cpu" else torch.float16
    ours, _, latent, params = sd_denoiser(size, 2, args.device, ours_dtype)
    ref, _, _, _ = sd_denoiser(size, 2, args.device, torch.float32)
    times = ours.process.time_grid(steps)

    def run_ref():
        x = prior_sample(ref, batch, latent, torch.Generator().manual_seed(0), args.device)
        reference_loop(ref, x, times, 7.5, torch.Generator().manual_seed(1))

    x0 = prior_sample(ref, batch, latent, torch.Generator().manual_seed(0), args.device)
    singles = _single_prompt_denoisers(ref)

    def network_batched():  # the network alone, as ours calls it: every prompt in one call per step
        for t in times[:-1]:
            ref(x0, t)

    def network_singles():  # and as the reference calls it: one call per prompt and one unconditional
        for t in times[:-1]:
            for single in singles:
                single(x0, t)

    with torch.inference_mode():
        run_ours = sampling_run(ours, And(), batch, latent, times, args.device)
        rounds = interleaved_times({"ours": run_ours, "reference": run_ref, "network_batched": network_batched,
                                    "network_singles": network_singles}, repeats, args.device)
    t_ours, t_ref = statistics.median(rounds["ours"]), statistics.median(rounds["reference"])
    emit(
        {
            "benchmark": "batching",
            "machine": machine(),
            "unet_parameters": params,
            "latent": list(latent),
            "steps": steps,
            "batch": batch,
            "ours_dtype": str(ours_dtype),
            "seconds_per_image_ours": round(t_ours / batch, 4),
            "seconds_per_image_reference": round(t_ref / batch, 4),
            "speedup_vs_reference_loop": round(median_ratio(rounds["reference"], rounds["ours"]), 3),
            # the same ratio for the network calls alone (float32 both): what batching can give at most here
            "network_speedup": round(median_ratio(rounds["network_singles"], rounds["network_batched"]), 3),
        },
        args.json,
    )


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("batching"):
        main()
