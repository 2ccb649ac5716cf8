"""How many weighted particles an expression that corrects gets by default, measured.

    python bench/particles.py --quick              # 2 seeds × 8192 particles per (target, K, steps)
    python bench/particles.py                      # 8 seeds
    python bench/particles.py --quick --markdown   # and write docs/benchmarks/particles.md

For each corrected expression on exact Gaussian mixtures (VP linear, β 0.1–20, float64) and each K, at the
step counts users run (25 and 50), the self-normalised estimate of a statistic the correction moves, from
groups of K particles (the same 8192 particles in all for every K), and its **relative error** against the
exact value, ± its standard error over groups. K = 1 carries no weights: it samples the uncorrected tree.
A K costs K times the network rows of one image.

The default (``superdiff.options.DEFAULT_CORRECTING_PARTICLES``) is the K with the smallest mean |relative
error| over the targets and both step counts (the smaller K where two are within the mean's standard error).
More particles are not always better at these step counts: the weights are accumulated on the step grid, so
at 25 steps a large K converges to the discretised weights' target, which can be farther from the exact one
than a small K's mix of corrected and uncorrected. The script prints the K its own figures pick and whether
the library's default is it.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from common import machine, parser
from superdiff import GaussianMixture, MixtureDenoiser, VPLinear, prior_sample, sample_sde
from superdiff.analytic import grid_moments, product_of_mixtures, soft_min_log_density, tempered_mixture
from superdiff.expressions import Anneal, Leaf, Not, Product, SoftMin, compile_expression
from superdiff.options import DEFAULT_CORRECTING_PARTICLES

VP = VPLinear(0.1, 20.0)
TOTAL = 8192  # particles per run: the library's row cap (16384) over the two models' outputs
KS = (1, 2, 4, 8, 16, 32)


def _two_mixtures(dim: int) -> tuple[GaussianMixture, GaussianMixture]:
    """tests/test_expressions.py's pair: modes at x₀ = ±1, the second shifted by 0.5 along x₁, weights 0.3/0.7."""
    m1, m2 = torch.zeros(2, dim), torch.zeros(2, dim)
    m1[:, 0] = m2[:, 0] = torch.tensor([-1.0, 1.0])
    m2[:, 1] = 0.5
    return GaussianMixture.create(m1, 0.4, [0.5, 0.5]), GaussianMixture.create(m2, 0.4, [0.3, 0.7])


def _second_moment(target: GaussianMixture, axis: int) -> float:
    return float((target.weights * (target.means[:, axis] ** 2 + target._component_variances()[:, axis])).sum())


def targets() -> dict[str, tuple[tuple[GaussianMixture, ...], object, Callable, float]]:
    """name → (models' mixtures, expression, statistic f(samples) (B,), its exact mean under the target)."""
    out = {}
    for dim in (2, 8):
        q1, q2 = _two_mixtures(dim)
        out[f"product, {dim}-D: E[x₁²]"] = ((q1, q2), Product((Leaf(0), Leaf(1))), lambda s: s[:, 1] ** 2,
                                            _second_moment(product_of_mixtures((q1, q2), (1, 1)), 1))
    q1, q2 = _two_mixtures(2)
    out["product q₁² q₂, 2-D: E[x₁²]"] = ((q1, q2), Product((Leaf(0), Leaf(1)), (2.0, 1.0)), lambda s: s[:, 1] ** 2,
                                         _second_moment(product_of_mixtures((q1, q2), (2, 1)), 1))
    # q_ref^(1+γ) q^(−γ) of isotropic Gaussians is Gaussian with precision (1+γ)/s_r² − γ/s_c² (γ = 1).
    ref, child = GaussianMixture.create([[0.0, 0.0]], 0.5), GaussianMixture.create([[1.0, 0.0]], 1.0)
    precision = 2 / 0.25 - 1 / 1.0
    mean0 = -1.0 / precision
    out["not(child, ref): Var x₀"] = ((ref, child), Not(Leaf(1), Leaf(0), 1.0), lambda s: (s[:, 0] - mean0) ** 2,
                                      1 / precision)
    a, b = GaussianMixture.create([[-1.0, 0.0]], 0.6), GaussianMixture.create([[1.0, 0.0]], 0.6)
    _, second = grid_moments(lambda x: soft_min_log_density((a, b), 4.0, x), -5.0, 5.0, 400)
    out["softmin λ = 4: E[x₀²]"] = ((a, b), SoftMin((Leaf(0), Leaf(1)), 4.0), lambda s: s[:, 0] ** 2, float(second[0]))
    q = GaussianMixture.create([[-1.5, 0.0], [1.5, 0.0]], 0.3, [0.3, 0.7])
    tempered = tempered_mixture(q, 2.0)
    main = int(tempered.weights.argmax())
    out["anneal β = 2: main proportion"] = ((q,), Anneal(Leaf(0), 2.0),
                                            lambda s: tempered.responsibilities(s)[:, main],
                                            float(tempered.weights[main]))
    return out


def group_estimates(mixtures, expression, f, particles: int, steps: int, seed: int) -> torch.Tensor:
    """Each group's self-normalised estimate of E[f] (TOTAL / particles groups)."""
    models = MixtureDenoiser(tuple(mixtures), VP)
    g = torch.Generator().manual_seed(seed)
    x = prior_sample(models, TOTAL, models.sample_shape, g, dtype=torch.float64)
    out = sample_sde(models, x, VP.time_grid(steps), compile_expression(expression), generator=g, particles=particles)
    w = torch.softmax(out.log_weights.reshape(-1, particles), -1)
    return (w * f(out.samples).reshape(-1, particles)).sum(-1)


def best_k(errors: dict[int, list[tuple[float, float]]]) -> tuple[int, dict[int, tuple[float, float]]]:
    """The K of smallest mean |relative error| (the smallest K within the best one's standard error), and
    each K's mean |error| ± standard error. ``errors``: K → (error, s.e.) per (target, steps)."""
    means = {k: (sum(abs(e) for e, _ in v) / len(v), math.sqrt(sum(se * se for _, se in v)) / len(v))
             for k, v in errors.items()}
    best = min(means, key=lambda k: means[k][0])
    return min(k for k in means if means[k][0] <= means[best][0] + means[best][1]), means


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    seeds = 2 if args.quick else 8
    step_counts = (args.steps,) if args.steps else (25, 50)
    start = time.time()
    print(f"machine: {machine()}; {seeds} seeds × {TOTAL} particles per (target, K, steps), exact Gaussian "
          "mixtures, VP linear (β 0.1–20), float64", flush=True)
    errors: dict[int, list[tuple[float, float]]] = {k: [] for k in KS}
    for steps in step_counts:
        print(f"\n{steps} steps: relative error of the estimate, (est − exact) / exact ± s.e.")
        print("| target | exact | " + " | ".join(f"K = {k}" for k in KS) + " |")
        print("|---|---" + "|---" * len(KS) + "|")
        for name, (mixtures, expression, f, exact) in targets().items():
            row = []
            for k in KS:
                groups = torch.cat([group_estimates(mixtures, expression, f, k, steps, seed) for seed in range(seeds)])
                error = (float(groups.mean()) - exact) / exact
                se = float(groups.std()) / math.sqrt(groups.numel()) / exact
                errors[k].append((error, abs(se)))
                row.append(f"{error:+.3f} ± {abs(se):.3f}")
            print(f"| {name} | {exact:.3f} | " + " | ".join(row) + " |", flush=True)
    chosen, means = best_k(errors)
    print(f"\nMean |relative error| over the targets and {' and '.join(map(str, step_counts))} steps ± s.e.")
    print("| K | " + " | ".join(str(k) for k in KS) + " |")
    print("|---" * (len(KS) + 1) + "|")
    print("| mean \\|error\\| | " + " | ".join(f"{means[k][0]:.3f} ± {means[k][1]:.3f}" for k in KS) + " |")
    verdict = "agrees" if chosen == DEFAULT_CORRECTING_PARTICLES else "DIFFERS: update superdiff.options"
    print(f"\nK these figures pick: {chosen}; superdiff.options.DEFAULT_CORRECTING_PARTICLES = "
          f"{DEFAULT_CORRECTING_PARTICLES} ({verdict})")
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("particles"):
        main()
