"""What the estimator and the combiners guarantee, measured on exact Gaussian mixtures (issue 28, items 13–17).

    python bench/guarantees.py            # 1024 samples / 4096 particles, steps up to 3000 (about 20 minutes)
    python bench/guarantees.py --quick    # 256 samples / 1024 particles, steps up to 1000 (a few minutes)

Writes ``docs/benchmarks/guarantees.md`` (``--quick``: ``guarantees-quick.md``). Every figure is against
exact log-densities or exact targets, seed 0, float64 unless said:

* **AND's exact gap** |log q₁ − log q₂| at AND's samples (the grid's last time) on asymmetric pairs, for
  the estimator variances ``"tweedie"`` (default) and ``"forward"``: median, mean, 90th percentile and
  the signed mean; and the tracked densities' own error (median |tracked − exact| log q).
* **Particles at small K**: the Feynman–Kac-corrected product of two mixtures (the tests' pair) with
  K particles per group and the same total number of particles: the relative error of E[x₁²] (2-D; the
  within-mode spread) and of the main component's proportion (8-D), each ± its standard error over groups.
  K = 1 is the uncorrected score sum (no weights act on one particle).
* **Soft-min at small K**: share of the correction recovered, (est − plain)/(exact − plain) for E[x₀²].
* **Few-step density error** of OR: median, mean and 90th percentile of |tracked − exact| log q, and the
  same for log q₁ − log q₂ (what κ reads), for ``"tweedie"``, ``"forward"`` and bare ``"euler"`` (Thm.
  2's S²/a² for step and estimator: where the few-step work started).
* **bf16 network outputs**: the default estimator's median error on Figure 2 when the exact x̂₀ is
  rounded to bfloat16, at 200 and 3000 steps (1000 with ``--quick``), beside float64.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from common import machine, parser
from superdiff import And, GaussianMixture, MixtureDenoiser, Or, VarianceExploding, VPLinear, prior_sample, sample_sde
from superdiff.analytic import grid_moments, product_of_mixtures, soft_min_log_density
from superdiff.expressions import Leaf, Product, SoftMin, compile_expression, uncorrected
from variance import figure2, random_mixtures

VP = VPLinear(0.1, 20.0)


def _stats(values: torch.Tensor) -> tuple[float, float, float]:
    v = values.flatten().double()
    return float(v.median()), float(v.mean()), float(torch.quantile(v, 0.9))


def and_pairs() -> dict:
    """Asymmetric pairs: a 3-component mixture against a 2-component one (3-D), and a Gaussian against a mixture."""
    gaussian = GaussianMixture.create([[0.5, -0.3, 0.2]], 0.8)
    return {"3-D mixtures (3 vs 2 components)": random_mixtures(3),
            "3-D Gaussian vs mixture": (gaussian, random_mixtures(3)[0])}


def and_gap(models: MixtureDenoiser, steps: int, density_variance: str, samples: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = prior_sample(models, samples, models.sample_shape, generator=g, dtype=torch.float64)
    times = models.process.time_grid(steps)
    out = sample_sde(models, x, times, And(), log_q_init=models.log_prob(x, times[0]), generator=g,
                     density_variance=density_variance)
    exact = models.log_prob(out.samples, times[-1])
    gap = exact[:, 0] - exact[:, 1]
    med, mean, p90 = _stats(gap.abs())
    return {"median": med, "mean": mean, "p90": p90, "signed_mean": float(gap.mean()),
            "tracked_error": float((out.log_densities - exact).abs().median())}


def two_mixtures(dim: int) -> tuple[GaussianMixture, GaussianMixture]:
    """tests/test_expressions.py's pair: modes at x₀ = ±1, the second shifted by 0.5 along x₁, weights 0.3/0.7."""
    m1, m2 = torch.zeros(2, dim), torch.zeros(2, dim)
    m1[:, 0] = m2[:, 0] = torch.tensor([-1.0, 1.0])
    m2[:, 1] = 0.5
    return GaussianMixture.create(m1, 0.4, [0.5, 0.5]), GaussianMixture.create(m2, 0.4, [0.3, 0.7])


def weighted_run(mixtures, expression, particles: int, total: int, steps: int, seed: int = 0):
    models = MixtureDenoiser(tuple(mixtures), VP)
    g = torch.Generator().manual_seed(seed)
    x = prior_sample(models, total, models.sample_shape, g, dtype=torch.float64)
    return sample_sde(models, x, VP.time_grid(steps), compile_expression(expression), generator=g,
                      particles=particles)


def group_estimate(out, particles: int, f) -> tuple[float, float]:
    """Mean over groups of each group's self-normalised estimate of E[f], and its standard error."""
    lw = out.log_weights if out.log_weights is not None else torch.zeros(out.samples.shape[0], dtype=torch.float64)
    w = torch.softmax(lw.reshape(-1, particles), -1)
    est = (w * f(out.samples).reshape(-1, particles)).sum(-1)
    return float(est.mean()), float(est.std()) / math.sqrt(est.numel())


def product_bias(dim: int, particles: int, total: int, steps: int) -> dict:
    q1, q2 = two_mixtures(dim)
    target = product_of_mixtures((q1, q2), (1, 1))
    expression = Product((Leaf(0), Leaf(1))) if particles > 1 else uncorrected(Product((Leaf(0), Leaf(1))))
    out = weighted_run((q1, q2), expression, particles, total, steps)
    main = int(target.weights.argmax())
    nearest = lambda s: torch.cdist(s, target.means).argmin(-1)  # noqa: E731
    share, share_se = group_estimate(out, particles, lambda s: (nearest(s) == main).double())
    second = float((target.weights * (target.means[:, 1] ** 2 + target._component_variances()[:, 1])).sum())
    m2, m2_se = group_estimate(out, particles, lambda s: s[:, 1] ** 2)
    return {"proportion_error": share - float(target.weights[main]), "proportion_se": share_se,
            "spread_rel_error": m2 / second - 1.0, "spread_se": m2_se / second,
            "resamples_per_group": float(out.resample_counts.double().mean()) if out.resample_counts is not None
            else 0.0}


def softmin_recovery(particles: int, total: int, steps: int) -> dict:
    q1, q2 = GaussianMixture.create([[-1.0, 0.0]], 0.6), GaussianMixture.create([[1.0, 0.0]], 0.6)
    expression = SoftMin((Leaf(0), Leaf(1)), 4.0)
    _, second = grid_moments(lambda x: soft_min_log_density((q1, q2), 4.0, x), -5.0, 5.0, 400)
    exact = float(second[0])
    corrected = weighted_run((q1, q2), expression, particles, total, steps)
    plain = weighted_run((q1, q2), uncorrected(expression), particles, total, steps)
    est, se = group_estimate(corrected, particles, lambda s: s[:, 0] ** 2)
    base, _ = group_estimate(plain, particles, lambda s: s[:, 0] ** 2)
    return {"recovered": (est - base) / (exact - base), "recovered_se": se / abs(exact - base),
            "resamples_per_group": float(corrected.resample_counts.double().mean())}


def few_step_error(models: MixtureDenoiser, steps: int, estimator: str, samples: int) -> dict:
    """OR from exact log q at the grid's first time; "euler" is Thm. 2's S²/a² for step and estimator."""
    g = torch.Generator().manual_seed(0)
    x = prior_sample(models, samples, models.sample_shape, generator=g, dtype=torch.float64)
    times = models.process.time_grid(steps)
    kw = ({"variance": "euler", "density_variance": "euler"} if estimator == "euler"
          else {"density_variance": estimator})
    out = sample_sde(models, x, times, Or(), log_q_init=models.log_prob(x, times[0]), generator=g, **kw)
    error = out.log_densities - models.log_prob(out.samples, times[-1])
    med, mean, p90 = _stats(error.abs())
    dmed, dmean, dp90 = _stats((error[:, 0] - error[:, 1]).abs())
    return {"median": med, "mean": mean, "p90": p90, "diff_median": dmed, "diff_mean": dmean, "diff_p90": dp90}


class Bf16Outputs(MixtureDenoiser):
    """The exact denoisers with their outputs rounded to bfloat16, as a network run in bf16 returns them."""

    def __call__(self, x, t):
        return super().__call__(x, t).to(torch.bfloat16).to(x.dtype)


def bf16_error(steps: int, bf16: bool, samples: int) -> float:
    cls = Bf16Outputs if bf16 else MixtureDenoiser
    models = cls(figure2(), VP)
    return few_step_error(models, steps, "tweedie", samples)["median"]


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    quick = args.quick
    samples, total = (256, 1024) if quick else (1024, 4096)
    and_steps = (100, 1000) if quick else (100, 1000, 3000)
    bf16_steps = (200, 1000) if quick else (200, 3000)
    start = time.time()
    lines = ["# What the estimator and the combiners guarantee: measurements", "",
             f"Written by `python bench/guarantees.py{' --quick' if quick else ''}` on {machine()}; seed 0, "
             f"{samples} samples ({total} particles in all for the particle rows), exact Gaussian mixtures, "
             "VP linear (β 0.1–20) unless said. See docs/guarantees.md for what the figures mean.", ""]

    lines += ["## AND's exact gap |log q₁ − log q₂| at its samples", "",
              "| pair | steps | estimator | median | mean | p90 | signed mean | tracked error (median) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, pair in and_pairs().items():
        models = MixtureDenoiser(pair, VP)
        for steps in and_steps:
            for estimator in ("tweedie", "forward"):
                r = and_gap(models, steps, estimator, samples)
                lines.append(f"| {name} | {steps} | {estimator} | {r['median']:.3f} | {r['mean']:.3f} "
                             f"| {r['p90']:.3f} | {r['signed_mean']:+.3f} | {r['tracked_error']:.3f} |")
                print(lines[-1], flush=True)

    lines += ["", "## Corrected product at K particles (200 steps, same total particles)", "",
              "K = 1 is the uncorrected score sum. Errors are estimate − exact, ± one standard error over groups.", "",
              "| K | 2-D: E[x₁²] relative error | 8-D: main proportion error | resamplings per group (2-D) |",
              "|---|---|---|---|"]
    for k in (1, 2, 4, 8, 16, 64):
        two, eight = product_bias(2, k, total, 200), product_bias(8, k, total, 200)
        lines.append(f"| {k} | {two['spread_rel_error']:+.3f} ± {two['spread_se']:.3f} | "
                     f"{eight['proportion_error']:+.3f} ± {eight['proportion_se']:.3f} | "
                     f"{two['resamples_per_group']:.1f} |")
        print(lines[-1], flush=True)

    lines += ["", "## Soft-min (λ = 4) at K particles (100 steps)", "",
              "| K | share of the correction recovered | resamplings per group |", "|---|---|---|"]
    for k in (2, 4, 8, 64):
        r = softmin_recovery(k, total, 100)
        lines.append(f"| {k} | {r['recovered']:.3f} ± {r['recovered_se']:.3f} | {r['resamples_per_group']:.1f} |")
        print(lines[-1], flush=True)

    lines += ["", "## Few-step density error of OR (|tracked − exact| log q, and of log q₁ − log q₂)", "",
              "| set-up | steps | estimator | median | mean | p90 | Δ median | Δ mean | Δ p90 |",
              "|---|---|---|---|---|---|---|---|---|"]
    few = {"Figure 2, VP linear": MixtureDenoiser(figure2(), VP),
           "3-D, VE": MixtureDenoiser(random_mixtures(3), VarianceExploding()),
           "8-D, VP linear": MixtureDenoiser(random_mixtures(8), VP)}
    for name, models in few.items():
        for steps in (20, 50, 200):
            for estimator in ("tweedie", "forward", "euler"):
                r = few_step_error(models, steps, estimator, samples)
                lines.append(f"| {name} | {steps} | {estimator} | {r['median']:.3f} | {r['mean']:.3f} "
                             f"| {r['p90']:.3f} | {r['diff_median']:.3f} | {r['diff_mean']:.3f} "
                             f"| {r['diff_p90']:.3f} |")
                print(lines[-1], flush=True)

    lines += ["", "## bf16 network outputs: the default estimator's median error on Figure 2", "",
              "| steps | float64 outputs | bf16 outputs |", "|---|---|---|"]
    for steps in bf16_steps:
        lines.append(f"| {steps} | {bf16_error(steps, False, samples):.3f} | {bf16_error(steps, True, samples):.3f} |")
        print(lines[-1], flush=True)

    lines += ["", f"Total time {time.time() - start:.0f} s.", ""]
    out = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / (
        "guarantees-quick.md" if quick else "guarantees.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
