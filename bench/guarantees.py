"""What the estimator and the combiners guarantee, measured on exact Gaussian mixtures (issue 28, items 13–16).

    python bench/guarantees.py            # 1024 samples / 4096 particles, AND up to 3000 steps
    python bench/guarantees.py --quick    # 256 samples / 1024 particles, AND at 100, 1000 and 3000 steps
    python bench/guarantees.py --quick --markdown   # and write docs/benchmarks/guarantees.md
    python bench/guarantees.py --quick --particles 8192 --markdown   # the docs' figures: particle rows at 8192

Every figure is against exact log-densities or exact targets, seed 0, float64, VP linear (β 0.1–20):

* **AND's exact gap** |log q₁ − log q₂| at AND's samples (the grid's last time) on asymmetric pairs:
  median, mean, 90th percentile and the signed mean, the tracked gap (0 for the exact solve), and the
  tracked densities' own error (median |tracked − exact| log q per model); for the exact solve under the estimator
  variances ``"tweedie"`` (default) and ``"forward"``, and ``And(feedback=ρ)`` under ``"tweedie"``.
* **Particles at small K**: the Feynman–Kac-corrected product of two mixtures (the tests' pair) with
  K particles per group and the same total number of particles: the relative error of E[x₁²] (2-D; the
  within-mode spread) and of the main component's proportion (8-D), each ± its standard error over groups.
  K = 1 is the uncorrected score sum (no weights act on one particle).
* **Soft-min at small K**: share of the correction recovered, (est − plain)/(exact − plain) for E[x₀²].
* **Nested AND** ``(0 | 1) & 2`` with a two-component third model: the share of (sample, step) pairs where
  the condition was not met (``SamplerOutput.and_converged``), and the largest tracked drift.

Few-step density errors beyond the median and bf16 outputs are in ``bench/few_steps.py``.
"""

from __future__ import annotations

import math
import time

import torch

from common import machine, parser
from superdiff import And, GaussianMixture, MixtureDenoiser, VPLinear, prior_sample, sample_sde
from superdiff.analytic import grid_moments, product_of_mixtures, soft_min_log_density
from superdiff.expressions import And as AndNode
from superdiff.expressions import Leaf, Or, Product, SoftMin, compile_expression, uncorrected
from variance import random_mixtures

VP = VPLinear(0.1, 20.0)


def _stats(values: torch.Tensor) -> tuple[float, float, float]:
    v = values.flatten().double()
    return float(v.median()), float(v.mean()), float(torch.quantile(v, 0.9))


def and_pairs() -> dict:
    """Asymmetric pairs: a 3-component mixture against a 2-component one (3-D), and a Gaussian against a mixture."""
    gaussian = GaussianMixture.create([[0.5, -0.3, 0.2]], 0.8)
    return {"3-D mixtures (3 vs 2 components)": random_mixtures(3),
            "3-D Gaussian vs mixture": (gaussian, random_mixtures(3)[0])}


def and_gap(models: MixtureDenoiser, steps: int, combiner: And, density_variance: str, samples: int) -> dict:
    """AND from the prior with equal tracked densities at the start (the default ``log_q_init``)."""
    g = torch.Generator().manual_seed(0)
    x = prior_sample(models, samples, models.sample_shape, generator=g, dtype=torch.float64)
    times = models.process.time_grid(steps)
    out = sample_sde(models, x, times, combiner, generator=g, density_variance=density_variance)
    exact = models.log_prob(out.samples, times[-1])
    gap = exact[:, 0] - exact[:, 1]
    med, mean, p90 = _stats(gap.abs())
    # log q_init = 0 for both, so the tracked values are relative to the exact ones at times[0]
    tracked = out.log_densities + models.log_prob(x, times[0])
    return {"median": med, "mean": mean, "p90": p90, "signed_mean": float(gap.mean()),
            "tracked_gap": float((out.log_densities[:, 0] - out.log_densities[:, 1]).abs().median()),
            "tracked_error": [float(v) for v in (tracked - exact).abs().median(0).values]}


def nested_and(steps: int, samples: int) -> dict:
    """``(0 | 1) & 2`` (tests/test_expressions.py's models, the third with two components): the share of
    (sample, step) pairs whose condition was not met, and the largest drift of the tracked potentials."""
    models = MixtureDenoiser((GaussianMixture.create([[-2.0, 0.0]], 0.6), GaussianMixture.create([[2.0, 0.0]], 0.6),
                              GaussianMixture.create([[0.0, 2.0], [0.0, -2.0]], 0.6)), VP)
    row = {}
    for density_variance in ("tweedie", "forward"):
        g = torch.Generator().manual_seed(0)
        x = prior_sample(models, samples, (2,), g, dtype=torch.float64)
        times = VP.time_grid(steps)
        out = sample_sde(models, x, times, compile_expression(AndNode((Or((Leaf(0), Leaf(1))), Leaf(2)))),
                         generator=g, density_variance=density_variance)
        tracked = torch.logsumexp(out.log_density_trace[..., :2], -1) - out.log_density_trace[..., 2]
        step_gap = tracked.diff(dim=0).abs()
        row[density_variance] = {"unmet": float((~out.and_converged).double().mean()),
                                 "met_max": float(step_gap[out.and_converged].max()),
                                 "drift_max": float((tracked - tracked[0]).abs().max())}
    return row


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
    # The main component's responsibility: its mean under the target is exactly the component's weight (the
    # nearest mean is not: the product's small cross components at x₀ = 0 take ~3% of the main one's samples).
    share, share_se = group_estimate(out, particles, lambda s: target.responsibilities(s)[:, main])
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


def log_weight_spread(expression, mixtures, steps: int, samples: int, fractions=(0.5, 0.8, 0.9, 0.95)) -> dict:
    """Where along the path the particles' log-weights spread: the variance of the accumulated log-weight
    after each share of the steps over its final variance (one particle per group, no resampling; each
    share is the same run stopped there by ``interrupt``). Returns {share: ratio, "final_sd": sd}."""
    models = MixtureDenoiser(tuple(mixtures), VP)
    combiner = compile_expression(expression)

    def run(stop: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        x = prior_sample(models, samples, models.sample_shape, g, dtype=torch.float64)
        taken = iter(range(steps + 1))
        out = sample_sde(models, x, VP.time_grid(steps), combiner, generator=g, interrupt=lambda: next(taken) >= stop)
        return out.log_weights

    final = float(run(steps).var())
    row = {f: float(run(round(f * steps)).var()) / final for f in fractions}
    return row | {"final_sd": math.sqrt(final)}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--particles", type=int, default=None,
                   help="particles in all for the particle rows (1024; full size 4096)")
    args = p.parse_args()
    quick = args.quick
    samples, total = (256, 1024) if quick else (1024, 4096)
    total = args.particles or total
    and_steps = (100, 1000, 3000) if quick else (100, 300, 1000, 3000)
    start = time.time()
    print(f"machine: {machine()}; seed 0, {samples} samples ({total} particles in all for the particle rows), "
          "exact Gaussian mixtures, VP linear (β 0.1–20)", flush=True)

    print("\nAND's exact gap |log q₁ − log q₂| at its samples (tracked densities start equal)")
    print("| pair | steps | AND | estimator | median | mean | p90 | signed mean | tracked gap "
          "| tracked error, model 1 / 2 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    variants = (("exact solve", And(), "tweedie"), ("exact solve", And(), "forward"),
                ("feedback 0.5", And(feedback=0.5), "tweedie"), ("feedback 0.2", And(feedback=0.2), "tweedie"))
    for name, pair in and_pairs().items():
        models = MixtureDenoiser(pair, VP)
        for steps in and_steps:
            for label, combiner, estimator in variants:
                r = and_gap(models, steps, combiner, estimator, samples)
                print(f"| {name} | {steps} | {label} | {estimator} | {r['median']:.3f} | {r['mean']:.3f} "
                      f"| {r['p90']:.3f} | {r['signed_mean']:+.3f} | {r['tracked_gap']:.3f} "
                      f"| {' / '.join(f'{v:.3f}' for v in r['tracked_error'])} |", flush=True)

    print("\nNested AND (0 | 1) & 2, two-component third model: share of (sample, step) pairs not met; largest "
          "step gap where met; largest tracked drift")
    print("| steps | tweedie: unmet | met max | drift max | forward: unmet | met max | drift max |")
    print("|---|---|---|---|---|---|---|")
    for steps in (25, 200):
        r = nested_and(steps, samples)
        print(f"| {steps} | " + " | ".join(f"{r[v]['unmet']:.4f} | {r[v]['met_max']:.1e} | {r[v]['drift_max']:.3f}"
                                            for v in ("tweedie", "forward")) + " |", flush=True)

    print("\nCorrected product at K particles per group (200 steps, the same total particles); K = 1 is the "
          "uncorrected score sum (no weights act); estimate − exact ± one standard error over groups")
    print("| K | 2-D: E[x₁²] relative error | 8-D: main proportion error | 2-D resamplings per group |")
    print("|---|---|---|---|")
    for k in (1, 2, 4, 8, 16, 64):
        two, eight = product_bias(2, k, total, 200), product_bias(8, k, total, 200)
        print(f"| {k} | {two['spread_rel_error']:+.3f} ± {two['spread_se']:.3f} | "
              f"{eight['proportion_error']:+.3f} ± {eight['proportion_se']:.3f} | "
              f"{two['resamples_per_group']:.1f} |", flush=True)

    print("\nSoft-min (λ = 4) at K particles (100 steps): share of the correction to E[x₀²] recovered")
    print("| K | recovered | resamplings per group |")
    print("|---|---|---|")
    for k in (2, 4, 8, 64):
        r = softmin_recovery(k, total, 100)
        print(f"| {k} | {r['recovered']:.3f} ± {r['recovered_se']:.3f} | {r['resamples_per_group']:.1f} |", flush=True)

    print("\nWhere the log-weights spread (100 steps, one particle per group): variance of the accumulated "
          "log-weight after a share of the steps / its final variance")
    print("| expression | 50% | 80% | 90% | 95% | final sd (nats) |")
    print("|---|---|---|---|---|---|")
    soft = (GaussianMixture.create([[-1.0, 0.0]], 0.6), GaussianMixture.create([[1.0, 0.0]], 0.6))
    for label, expression, mixtures in (("soft-min λ = 4", SoftMin((Leaf(0), Leaf(1)), 4.0), soft),
                                        ("product (2-D)", Product((Leaf(0), Leaf(1))), two_mixtures(2))):
        r = log_weight_spread(expression, mixtures, 100, samples)
        print(f"| {label} | " + " | ".join(f"{r[f]:.3f}" for f in (0.5, 0.8, 0.9, 0.95))
              + f" | {r['final_sd']:.2f} |", flush=True)
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("guarantees"):
        main()
