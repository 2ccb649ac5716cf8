"""SDE sampling with Itô densities against ODE sampling with Hutchinson divergences, equal steps.

Both track every prompt's log-density for OR on the same SD-shaped model. The SDE reuses the
network outputs it needs anyway; the ODE (Prop. 5) needs a divergence per step: one JVP for all
prompts, or (``hutchinson_vjp``) one forward plus a VJP per prompt. Key ``speedup`` is the ODE
time over the SDE time with the faster of the two divergence modes; the paper measured 5.2× on SD.
"""

from __future__ import annotations

import statistics

import torch
from diffusers.models.attention_processor import AttnProcessor

from common import emit, interleaved_times, machine, median_ratio, parser, sd_denoiser
from superdiff import Or, prior_sample, sample_ode, sample_sde


def main() -> None:
    args = parser(__doc__).parse_args()
    size = "tiny" if (args.quick or args.device == "cpu") else "small"
    dtype = torch.float32
    steps = args.steps or (10 if args.quick else 50)
    batch = 1
    repeats = args.repeats or (3 if args.quick else 3)
    denoiser, unet, latent, params = sd_denoiser(size, 2, args.device, dtype)
    unet.set_attn_processor(AttnProcessor())  # forward-mode AD needs the plain attention math
    times = denoiser.process.time_grid(steps, t_end=0.02)

    def start():
        return prior_sample(denoiser, batch, latent, torch.Generator().manual_seed(0), args.device)

    def sde():
        with torch.inference_mode():
            sample_sde(denoiser, start(), times, Or(), guidance_scale=7.5, generator=torch.Generator().manual_seed(1))

    def ode(mode):
        return lambda: sample_ode(denoiser, start(), times, Or(), guidance_scale=7.5, divergence=mode,
                                  generator=torch.Generator().manual_seed(1))

    rounds = interleaved_times(
        {"sde": sde, "jvp": ode("hutchinson"), "vjp": ode("hutchinson_vjp")}, repeats, args.device
    )
    t_sde, t_jvp, t_vjp = (statistics.median(rounds[k]) for k in ("sde", "jvp", "vjp"))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        sde()
        mem_sde = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ode("hutchinson" if t_jvp <= t_vjp else "hutchinson_vjp")()
        mem_ode = torch.cuda.max_memory_allocated()
    emit(
        {
            "benchmark": "ito_vs_hutchinson",
            "machine": machine(),
            "unet_parameters": params,
            "latent": list(latent),
            "steps": steps,
            "seconds_sde_ito": round(t_sde, 4),
            "seconds_ode_hutchinson_jvp": round(t_jvp, 4),
            "seconds_ode_hutchinson_vjp": round(t_vjp, 4),
            "speedup": round(median_ratio(rounds["jvp" if t_jvp <= t_vjp else "vjp"], rounds["sde"]), 3),
            "speedup_vs_jvp": round(median_ratio(rounds["jvp"], rounds["sde"]), 3),
            **(
                {"peak_memory_ratio_ode_over_sde": round(mem_ode / mem_sde, 3)}
                if args.device.startswith("cuda")
                else {}
            ),
        },
        args.json,
    )


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("ito_vs_hutchinson"):
        main()
