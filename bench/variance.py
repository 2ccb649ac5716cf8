"""Which reverse-kernel variances to sample and to score with: exact mixtures, every process, 8–100 steps.

    python bench/variance.py                 # the README's table, about 6 minutes on 2 CPU cores
    python bench/variance.py --step-counts 12 --samples 500

For each set-up (exact Gaussian mixtures, so every figure is checked against true log-densities)
and each pair (step variance / estimator variance), OR is sampled twice from the same noise:
``err`` is the median |tracked − exact| log q over models and samples on a grid that stops before
σ = 0 (log q started exact); ``ll`` is the mean exact log-likelihood of the samples under the OR
target (the mixture of the models' data) minus that of the data itself, with the pipelines' last
step onto σ = 0. ``ll`` < 0: samples too spread (noisy); > 0: too concentrated.
"""

from __future__ import annotations

import json
import math

import torch

from common import machine, parser
from superdiff import (
    EDM,
    DiscreteSigma,
    GaussianMixture,
    MixtureDenoiser,
    Or,
    RectifiedFlow,
    VarianceExploding,
    VPLinear,
    prior_sample,
    sample_sde,
)

PAIRS = (("posterior", "forward"), ("forward", "forward"), ("posterior", "posterior"))


def random_mixtures(dim: int, seed: int = 1) -> tuple[GaussianMixture, GaussianMixture]:
    g = torch.Generator().manual_seed(seed)
    a = GaussianMixture.create(torch.randn(3, dim, generator=g) * 1.5, 0.3, [0.5, 0.3, 0.2])
    b = GaussianMixture.create(torch.randn(2, dim, generator=g) * 1.5, 0.4)
    return a, b


def figure2() -> tuple[GaussianMixture, GaussianMixture]:
    return (
        GaussianMixture.create([[-1.5, 1.5], [1.5, 1.5]], 0.4),
        GaussianMixture.create([[-1.5, -1.5], [1.5, -1.5]], 0.4),
    )


def sd_sigma_grid():
    """Stable Diffusion's Euler scheduler (scaled-linear β, 1000 steps): its process and its time grids."""
    from diffusers import EulerDiscreteScheduler

    from superdiff.pipelines.denoisers import schedule_from_scheduler

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    return DiscreteSigma.from_scheduler(scheduler), lambda n: schedule_from_scheduler(scheduler, n).times


def setups() -> dict:
    sd, sd_grid = sd_sigma_grid()
    return {
        "Figure 2, VP linear": (figure2(), VPLinear(0.1, 20.0), None),
        "3-D, VP linear": (random_mixtures(3), VPLinear(0.1, 20.0), None),
        "8-D, VP linear": (random_mixtures(8), VPLinear(0.1, 20.0), None),
        "3-D, SD σ-grid": (random_mixtures(3), sd, sd_grid),
        "3-D, VE": (random_mixtures(3), VarianceExploding(), None),
        "3-D, EDM": (random_mixtures(3), EDM(), None),
        "3-D, rectified flow": (random_mixtures(3), RectifiedFlow(), None),
    }


def target_log_prob(mixtures, x: torch.Tensor) -> torch.Tensor:
    """log of the OR target (the equal-weight mixture of the models' data) at σ = 0."""
    lp = torch.stack([m.log_prob(x, 1.0, 0.0) for m in mixtures], -1)
    return torch.logsumexp(lp, -1) - math.log(len(mixtures))


def measure(setup, steps: int, variance: str, density_variance: str, samples: int) -> dict:
    mixtures, process, grid = setup
    models = MixtureDenoiser(mixtures, process)
    times = grid(steps) if grid else process.time_grid(steps)
    tracked = times[:-1] if float(process.sigma(times[-1])) == 0 or grid else times
    g = torch.Generator().manual_seed(0)
    x = prior_sample(models, samples, models.sample_shape, generator=g, dtype=torch.float64)
    out = sample_sde(models, x, tracked, Or(), log_q_init=models.log_prob(x, tracked[0]), generator=g,
                     variance=variance, density_variance=density_variance)
    err = float((out.log_densities - models.log_prob(out.samples, tracked[-1])).abs().median())
    g = torch.Generator().manual_seed(0)
    x = prior_sample(models, samples, models.sample_shape, generator=g, dtype=torch.float64)
    out = sample_sde(models, x, times, Or(), generator=g, variance=variance, density_variance=density_variance,
                     final_denoise=True)
    data = torch.cat([m.sample(20000, torch.Generator().manual_seed(5)) for m in mixtures])
    ll = float(target_log_prob(mixtures, out.samples).mean() - target_log_prob(mixtures, data).mean())
    return {"err": err, "ll": ll}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--step-counts", default="8,12,20,50,100", help="comma-separated step counts")
    p.add_argument("--samples", type=int, default=1000)
    args = p.parse_args()
    steps = [int(s) for s in args.step_counts.split(",")]
    results = {}
    print(
        f"machine: {machine()}; {args.samples} samples; err = median |tracked − exact| (nats), ll = sample − data "
        "mean log p"
    )
    for name, setup in setups().items():
        for n in steps:
            row = {f"{v}/{dv}": measure(setup, n, v, dv, args.samples) for v, dv in PAIRS}
            results.setdefault(name, {})[n] = row
            cells = "  ".join(f"{k}: err {r['err']:7.3f} ll {r['ll']:+7.3f}" for k, r in row.items())
            print(f"{name:22s} {n:4d}  {cells}", flush=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("variance"):
        main()
