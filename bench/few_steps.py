"""Few-step SuperDiff (issue 16): the Itô estimator's density error by time grid and kernel variance.

    python bench/few_steps.py             # every table: 2048 samples, 20–1000 steps, about 4 minutes on one thread
    python bench/few_steps.py --quick     # 256 samples, 20 and 50 steps, quality at 2 and 12, composition at 25
    python bench/few_steps.py --quick --markdown ../docs/benchmarks/few_steps_quick.md   # from bench/: that page

Exact Gaussian mixtures (``bench/variance.py``'s set-ups), so every figure is checked against true
log-densities. A variant is a time grid (:mod:`superdiff.time_grids`) and the pair step variance /
estimator variance (``sample_sde``'s ``variance`` / ``density_variance``); the first is the default
before this issue (uniform grid, posterior / forward), "uniform, posterior/tweedie" today's. For each,
OR is sampled from the same noise:

* ``err``: median |tracked − exact| log q over models and samples, log q started exact at the
  grid's first time, on the grid as it is (it ends at the process's t_min, σ > 0);
* ``ll``: mean exact log p_data of the samples (p_data the OR target, the equal mixture of the models'
  data) minus its exact expectation E_p[log p] (Monte Carlo over 200 000 data draws, ±0.005), with the
  pipelines' last step onto σ = 0 (``final_denoise=True``). < 0: samples too spread; > 0: too
  concentrated. Its own sampling noise is about ±0.04 at 2048 samples.

Goal of the issue: err ≤ 1 nat at 20 steps and ≤ 0.3 at 50 on every set-up, with the same network
evaluations per step (every variant here makes one call per step).

``err`` beyond the median: for the old default, the bare ``"euler"`` (Thm. 2's S²/a² for step and
estimator, where the few-step work started) and today's default, the same runs' mean and 90th percentile,
and the same three for the error in log q₁ − log q₂, which κ reads. bf16 (``--bf16-steps``, default
200,3000): the default estimator's error on Figure 2 when the exact x̂₀ is rounded to bfloat16.

Composition at few steps (``--composition-steps``, default 25,100,1000; ``--quick`` 25), uniform grid,
``"forward"`` against ``"tweedie"``: AND's median exact gap |log q₁ − log q₂| of its samples at the
grid's last time (0 for a perfect AND; the tracked densities are equal by construction), and OR's
mean exact posterior of model 1, which is 0.5 for samples of the equal mixture.

Where the 8-D remainder comes from (``--oracle-samples``, default 512; ``--quick`` skips it): the 8-D
rows at 20 and 50 steps with the estimate λ̂, with the exact Jacobian trace in its place, and with each
model's exact posterior covariance (:func:`oracle_density_error`); and, at the ``ll`` step counts,
the samples of moment-matched Gaussian steps with exact κ (:func:`oracle_sample_quality`), the best a
Gaussian step can do.

On the embedded models (``--embedded-steps``, default 10,25,50,200; ``--quick`` 4,8; 0 skips): the
digits OR's Fréchet distance to the held-out test digits (200 samples; ``"forward"`` and
``"tweedie"``, the pipelines' ``density_variance``) and the shapes AND both-rate on red + circle (64
samples, guidance 5, both variances), seed 0.
"""

from __future__ import annotations

import json
import math
import time

import torch

from common import machine, parser
from superdiff import EDM, And, MixtureDenoiser, Or, VarianceExploding, VPLinear, prior_sample, sample_sde
from superdiff.time_grids import GRIDS
from variance import figure2, random_mixtures, target_log_prob

#: (name, grid, step variance, estimator variance); the first is the samplers' default before issue 16,
#: the second the bare Thm. 2 variance S²/a² for step and estimator the few-step work started from,
#: "uniform, posterior/tweedie" today's.
VARIANTS = (
    ("uniform, posterior/forward (old default)", "uniform", "posterior", "forward"),
    ("uniform, euler/euler (bare S², the start)", "uniform", "euler", "euler"),
    ("quadratic, posterior/forward", "quadratic", "posterior", "forward"),
    ("log-SNR, posterior/forward", "log_snr", "posterior", "forward"),
    ("EDM ρ=7, posterior/forward", "edm", "posterior", "forward"),
    ("uniform, forward/forward", "uniform", "forward", "forward"),
    ("quadratic, forward/forward", "quadratic", "forward", "forward"),
    ("uniform, posterior/tweedie (default)", "uniform", "posterior", "tweedie"),
    ("quadratic, posterior/tweedie", "quadratic", "posterior", "tweedie"),
    ("uniform, tweedie/tweedie", "uniform", "tweedie", "tweedie"),
)
GOAL = {20: 1.0, 50: 0.3}


def setups() -> dict:
    """The issue's rows: (mixtures, process)."""
    return {
        "Figure 2, VP linear": (figure2(), VPLinear(0.1, 20.0)),
        "3-D, unequal weights, VP linear": (random_mixtures(3), VPLinear(0.1, 20.0)),
        "3-D, VE": (random_mixtures(3), VarianceExploding()),
        "3-D, EDM": (random_mixtures(3), EDM()),
        "8-D, VP linear": (random_mixtures(8), VPLinear(0.1, 20.0)),
        "8-D, VE": (random_mixtures(8), VarianceExploding()),
    }


def density_error(models: MixtureDenoiser, times: torch.Tensor, variance: str, density_variance: str,
                  samples: int) -> float:
    """Median |tracked − exact| log q at the grid's last time, OR from exact log q at its first."""
    g = torch.Generator().manual_seed(0)
    x = prior_sample(models, samples, models.sample_shape, generator=g, dtype=torch.float64)
    out = sample_sde(models, x, times, Or(), log_q_init=models.log_prob(x, times[0]), generator=g,
                     variance=variance, density_variance=density_variance)
    return float((out.log_densities - models.log_prob(out.samples, times[-1])).abs().median())


def density_error_spread(models: MixtureDenoiser, times: torch.Tensor, variance: str, density_variance: str,
                         samples: int) -> dict:
    """:func:`density_error`'s run, summarised beyond its median: median, mean and 90th percentile of
    |tracked − exact| log q, and of the error in log q₁ − log q₂ (what OR's and AND's κ read)."""
    g = torch.Generator().manual_seed(0)
    x = prior_sample(models, samples, models.sample_shape, generator=g, dtype=torch.float64)
    out = sample_sde(models, x, times, Or(), log_q_init=models.log_prob(x, times[0]), generator=g,
                     variance=variance, density_variance=density_variance)
    error = out.log_densities - models.log_prob(out.samples, times[-1])
    summary = {}
    for key, values in (("", error.abs().flatten()), ("Δ ", (error[:, 0] - error[:, 1]).abs())):
        summary |= {f"{key}median": float(values.median()), f"{key}mean": float(values.mean()),
                    f"{key}p90": float(torch.quantile(values, 0.9))}
    return summary


class Bf16Outputs(MixtureDenoiser):
    """The exact denoisers with their outputs rounded to bfloat16, as a network run in bf16 returns them."""

    def __call__(self, x, t):
        return super().__call__(x, t).to(torch.bfloat16).to(x.dtype)


def sample_quality(models: MixtureDenoiser, times: torch.Tensor, variance: str, density_variance: str,
                   samples: int, expected: float) -> float:
    """Mean exact log p_data of OR samples (last step onto σ = 0) minus E_p[log p_data]."""
    g = torch.Generator().manual_seed(0)
    x = prior_sample(models, samples, models.sample_shape, generator=g, dtype=torch.float64)
    out = sample_sde(models, x, times, Or(), generator=g, variance=variance, density_variance=density_variance,
                     final_denoise=True)
    return float(target_log_prob(models.mixtures, out.samples).mean()) - expected


def composition_accuracy(models: MixtureDenoiser, times: torch.Tensor, density_variance: str,
                         samples: int) -> tuple[float, float, float]:
    """AND's median exact gap |log q₁ − log q₂|, OR's mean exact posterior of model 1 (0.5 for the
    equal mixture), both at the grid's last time, from the same noise, and the share of AND's
    (sample, step) pairs whose quadratic condition was solved (1 with one common variance)."""
    out = {}
    converged = 1.0
    for name, combiner in (("and", And()), ("or", Or())):
        g = torch.Generator().manual_seed(0)
        x = prior_sample(models, samples, models.sample_shape, generator=g, dtype=torch.float64)
        run = sample_sde(models, x, times, combiner, log_q_init=models.log_prob(x, times[0]), generator=g,
                         density_variance=density_variance)
        out[name] = models.log_prob(run.samples, times[-1])
        if run.and_converged is not None:
            converged = float(run.and_converged.double().mean())
    gap = (out["and"][:, 0] - out["and"][:, 1]).abs().median()
    return float(gap), float(torch.softmax(out["or"], -1)[:, 0].mean()), converged


def oracle_density_error(models: MixtureDenoiser, times: torch.Tensor, covariance: str, samples: int) -> float:
    """OR's median density error when each model's reverse kernel gets its *exact* posterior covariance.

    A diagnosis of ``density_variance="tweedie"``, which uses β̃ + c₀² (σ²/α) λ̂ I with λ̂ a free estimate of
    tr(∂x̂₀ⁱ/∂x)/d: here ``covariance="exact trace"`` puts the exact trace in its place (what the isotropic
    form can reach), ``"exact"`` the whole matrix β̃ I + c₀² (σ²/α) sym(∂x̂₀ⁱ/∂x) (exact for the mixtures,
    by autograd; d Jacobian columns per model and step, so never free on a network). Same loop, noise and
    start as :func:`density_error` (the sampler's defaults otherwise).
    """
    from superdiff.density import transition_coefficients
    from superdiff.sampling import randn

    g = torch.Generator().manual_seed(0)
    x = prior_sample(models, samples, models.sample_shape, generator=g, dtype=torch.float64)
    log_q = models.log_prob(x, times[0])
    alphas, sigmas = models.process.alpha(times), models.process.sigma(times)
    d = x.shape[-1]
    eye = torch.eye(d, dtype=torch.float64)
    for i in range(times.numel() - 1):
        c = transition_coefficients(float(alphas[i]), float(sigmas[i]), float(alphas[i + 1]), float(sigmas[i + 1]))
        denoised = models(x, times[i])  # (M, B, d)
        mixed = (torch.softmax(log_q, -1).T[:, :, None] * denoised).sum(0)
        y = c.c_x * x + c.c_0 * mixed + math.sqrt(c.var) * randn(tuple(x.shape), g, x.device, x.dtype)
        beta_tilde = c.sigma_t**2 * c.S2 / c.sigma_s**2
        increments = []
        for k in range(denoised.shape[0]):
            jac = torch.vmap(torch.func.jacrev(lambda z, k=k, t=times[i]: models(z[None], t)[k, 0]))(x)  # (B, d, d)
            cov = c.sigma_s**2 / c.alpha_s * 0.5 * (jac + jac.mT)
            if covariance == "exact trace":
                cov = torch.diagonal(cov, dim1=1, dim2=2).mean(-1)[:, None, None] * eye
            kernel = torch.distributions.MultivariateNormal(c.c_x * x + c.c_0 * denoised[k],
                                                            covariance_matrix=beta_tilde * eye + c.c_0**2 * cov)
            increments.append(kernel.log_prob(y))
        backward = x - c.a * y  # log k(x | y), common to the models
        log_k = -0.5 * (backward * backward).sum(-1) / c.S2 - 0.5 * d * math.log(2 * math.pi * c.S2)
        log_q = log_q + torch.stack(increments, -1) - log_k[:, None]
        x = y
    return float((log_q - models.log_prob(x, times[-1])).abs().median())


def oracle_sample_quality(models: MixtureDenoiser, times: torch.Tensor, covariance: str, samples: int,
                          expected: float) -> float:
    """``ll`` of OR samples when every step is the moment-matched Gaussian of the exact transition.

    κ from the exact log-densities, the mean Tweedie's E[x_t | x_s] of the OR mixture, the covariance
    β̃ I + c₀² Cov[x₀ | x_s] with the mixture's exact posterior covariance (``"exact"``, by autograd
    through x̂₀ and κ) or its trace (``"exact trace"``), the last step onto σ = 0. What no Gaussian step
    with one network call per step can beat; :func:`sample_quality`'s start and noise.
    """
    from superdiff.density import transition_coefficients
    from superdiff.sampling import randn

    g = torch.Generator().manual_seed(0)
    x = prior_sample(models, samples, models.sample_shape, generator=g, dtype=torch.float64)
    alphas, sigmas = models.process.alpha(times), models.process.sigma(times)
    steps = times.numel() - 1

    def mixed_denoised(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # (B, d) → (B, d), exact κ
        kappa = torch.softmax(models.log_prob(z, t), -1)
        return (kappa.T[:, :, None] * models(z, t)).sum(0)

    for i in range(steps):
        last = i == steps - 1
        c = transition_coefficients(float(alphas[i]), float(sigmas[i]), float(alphas[i + 1]),
                                    0.0 if last else float(sigmas[i + 1]))
        mean = mixed_denoised(x, times[i])
        if last:
            x = mean
            break
        beta_tilde = c.sigma_t**2 * c.S2 / c.sigma_s**2
        jac = torch.vmap(torch.func.jacrev(lambda z, t=times[i]: mixed_denoised(z[None], t)[0]))(x)
        cov = beta_tilde * torch.eye(x.shape[-1], dtype=x.dtype) + c.c_0**2 * c.sigma_s**2 / c.alpha_s * 0.5 * (
            jac + jac.mT)
        if covariance == "exact trace":
            cov = torch.diagonal(cov, dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(x.shape[-1], dtype=x.dtype)
        values, vectors = torch.linalg.eigh(cov)
        root = vectors * values.clamp_min(0).sqrt()[:, None, :]
        noise = (root @ randn(tuple(x.shape), g, x.device, x.dtype)[:, :, None])[..., 0]
        x = c.c_x * x + c.c_0 * mean + noise
    return float(target_log_prob(models.mixtures, x).mean()) - expected


def expected_log_prob(mixtures) -> float:
    """E_p[log p] of the OR target p = ½(p_A + p_B): equal draws from each model's data."""
    data = torch.cat([m.sample(100_000, torch.Generator().manual_seed(5)) for m in mixtures])
    return float(target_log_prob(mixtures, data).mean())


def table(title: str, values: dict, columns: list[int], fmt: str) -> str:
    head = f"{title}\n| set-up | " + " | ".join(str(n) for n in columns) + " |\n|---|" + "---|" * len(columns)
    rows = [f"| {name} | " + " | ".join(format(row[n], fmt) for n in columns) + " |" for name, row in values.items()]
    return "\n".join([head, *rows])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=None, help="samples per run (2048; --quick: 256)")
    p.add_argument("--step-counts", default=None, help="comma-separated step counts for err (20,50,100,300,1000)")
    p.add_argument("--quality-steps", default=None, help="comma-separated step counts for ll (2,12,50)")
    p.add_argument("--composition-steps", default=None,
                   help="comma-separated step counts for AND's exact gap and OR's share (25,100,1000; --quick 25)")
    p.add_argument("--oracle-samples", type=int, default=None,
                   help="samples for the exact-covariance diagnosis of the 8-D rows (512; --quick 0: skipped)")
    p.add_argument("--embedded-steps", default=None,
                   help="comma-separated step counts for the embedded models (10,25,50,200; --quick 4,8; 0 skips)")
    p.add_argument("--bf16-steps", default="200,3000",
                   help="comma-separated step counts for the bf16-output rows (Figure 2; 0 skips)")
    args = p.parse_args()
    samples = args.samples or (256 if args.quick else 2048)
    if args.steps:
        steps = quality_steps = [args.steps]
    else:
        steps = [int(s) for s in (args.step_counts or ("20,50" if args.quick else "20,50,100,300,1000")).split(",")]
        quality_steps = [int(s) for s in (args.quality_steps or ("2,12" if args.quick else "2,12,50")).split(",")]
    start = time.perf_counter()
    print(
        f"machine: {machine()}; {samples} samples, OR, exact mixtures; err = median |tracked − exact| log q (nats); "
        "ll = mean exact log p_data of the samples − E_p[log p_data] (last step onto σ = 0)",
        flush=True,
    )
    cases = setups()
    expected = {name: expected_log_prob(mixtures) for name, (mixtures, _) in cases.items()}
    err: dict = {}
    ll: dict = {}
    for variant, grid_name, variance, density_variance in VARIANTS:
        grid = GRIDS[grid_name]
        for name, (mixtures, process) in cases.items():
            models = MixtureDenoiser(mixtures, process)
            err.setdefault(variant, {})[name] = {
                n: density_error(models, grid(process, n), variance, density_variance, samples) for n in steps
            }
            ll.setdefault(variant, {})[name] = {
                n: sample_quality(models, grid(process, n), variance, density_variance, samples, expected[name])
                for n in quality_steps
            }
        print(f"\n{table(f'err, {variant}', err[variant], steps, '.3f')}", flush=True)
    for variant in err:
        print(f"\n{table(f'll, {variant}', ll[variant], quality_steps, '+.2f')}", flush=True)
    # Per set-up and goal column: the variant with the smallest error, and whether it meets the goal.
    best: dict = {}
    lines = ["\nbest variant per set-up (goal: err ≤ 1 at 20 steps, ≤ 0.3 at 50)"]
    for name in cases:
        for n in (n for n in GOAL if n in steps):
            variant = min(err, key=lambda v: round(err[v][name][n], 9))  # a tie goes to the earlier variant
            value = err[variant][name][n]
            best.setdefault(name, {})[n] = {"variant": variant, "err": value, "meets_goal": value <= GOAL[n]}
            default = err[VARIANTS[0][0]][name][n]
            lines.append(f"{name:32s} {n:4d} steps: {variant:38s} err {value:.3f} (old default {default:.3f}) "
                         f"{'meets' if value <= GOAL[n] else 'misses'} ≤ {GOAL[n]}")
    print("\n".join(lines))
    print("(on VE the log-SNR grid is the uniform one, on EDM the EDM ρ=7 grid is, to float rounding)")
    # Beyond the median: the same runs' mean and 90th percentile, and the error in log q₁ − log q₂.
    spread_variants = [VARIANTS[1], VARIANTS[0], next(v for v in VARIANTS if v[0].endswith("(default)"))]
    spread: dict = {}
    lines = ["\nerr beyond the median (uniform grid): median / mean / p90 of |tracked − exact| log q, and of the "
             "error in log q₁ − log q₂ (Δ)",
             "| set-up | steps | variant | median | mean | p90 | Δ median | Δ mean | Δ p90 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, (mixtures, process) in cases.items():
        models = MixtureDenoiser(mixtures, process)
        for n in steps:
            for variant, grid_name, variance, density_variance in spread_variants:
                row = density_error_spread(models, GRIDS[grid_name](process, n), variance, density_variance, samples)
                spread.setdefault(name, {}).setdefault(n, {})[variant] = row
                lines.append(f"| {name} | {n} | {variant} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    print("\n".join(lines), flush=True)
    # bf16 network outputs: the default estimator's error as the steps grow (Figure 2 set-up).
    bf16_steps = [args.steps] if args.steps else [int(v) for v in args.bf16_steps.split(",") if int(v) > 0]
    bf16: dict = {}
    if bf16_steps:
        mixtures, process = cases["Figure 2, VP linear"]
        lines = ["\nbf16 network outputs (exact x̂₀ rounded to bfloat16), Figure 2, default estimator: err median "
                 "/ mean / p90", "| steps | float64 outputs | bf16 outputs |", "|---|---|---|"]
        for n in bf16_steps:
            rows = [density_error_spread(cls(mixtures, process), process.time_grid(n), "posterior", "tweedie", samples)
                    for cls in (MixtureDenoiser, Bf16Outputs)]
            bf16[n] = {"float64": rows[0], "bf16": rows[1]}
            lines.append(f"| {n} | " + " | ".join(f"{r['median']:.3f} / {r['mean']:.3f} / {r['p90']:.3f}"
                                                  for r in rows) + " |")
        print("\n".join(lines), flush=True)
    composition_default = "25" if args.quick else "25,100,1000"
    composition_steps = [int(v) for v in (args.composition_steps or composition_default).split(",")]
    composition: dict = {}
    for density_variance in ("forward", "tweedie"):
        for name, (mixtures, process) in cases.items():
            models = MixtureDenoiser(mixtures, process)
            for n in composition_steps:
                gap, share, converged = composition_accuracy(models, process.time_grid(n), density_variance, samples)
                values = {f"AND exact gap, {density_variance}": gap, f"OR share of model 1, {density_variance}": share}
                if density_variance == "tweedie":
                    values["AND quadratic condition solved, tweedie"] = converged
                for title, value in values.items():
                    composition.setdefault(title, {}).setdefault(name, {})[n] = value
    for title, rows in composition.items():
        print(f"\n{table(title + ' (uniform grid)', rows, composition_steps, '.3f')}", flush=True)
    oracle_samples = args.oracle_samples if args.oracle_samples is not None else (0 if args.quick else 512)
    oracle: dict = {}
    oracle_ll: dict = {}
    if oracle_samples:
        for name in (n for n in cases if n.startswith("8-D")):
            mixtures, process = cases[name]
            models = MixtureDenoiser(mixtures, process)
            for n in (n for n in GOAL if n in steps):
                times = process.time_grid(n)
                oracle.setdefault(name, {})[n] = {
                    "tweedie (λ̂, isotropic)": density_error(models, times, "posterior", "tweedie", oracle_samples),
                    "exact trace, isotropic": oracle_density_error(models, times, "exact trace", oracle_samples),
                    "exact covariance": oracle_density_error(models, times, "exact", oracle_samples)}
        lines = [f"\nwhere the 8-D remainder comes from ({oracle_samples} samples, err at 20 / 50 steps):"]
        for name, row in oracle.items():
            for kind in next(iter(row.values())):
                lines.append(f"{name:16s} {kind:26s} " + " / ".join(f"{row[n][kind]:.3f}" for n in row))
        for n in quality_steps:  # sample quality of moment-matched Gaussian steps with exact κ
            for name, (mixtures, process) in cases.items():
                models = MixtureDenoiser(mixtures, process)
                oracle_ll.setdefault(name, {})[n] = {
                    kind: oracle_sample_quality(models, process.time_grid(n), kind, oracle_samples, expected[name])
                    for kind in ("exact trace", "exact")}
        lines.append(f"\nll of moment-matched Gaussian steps with exact κ ({oracle_samples} samples; exact trace / "
                     "exact covariance):")
        for name, row in oracle_ll.items():
            lines.append(f"{name:32s} " + "   ".join(f"{n} steps {v['exact trace']:+.2f} / {v['exact']:+.2f}"
                                                    for n, v in row.items()))
        print("\n".join(lines), flush=True)
    embedded_steps = [int(v) for v in (args.embedded_steps or ("4,8" if args.quick else "10,25,50,200")).split(",")
                      if int(v) > 0]
    embedded = embedded_rows(embedded_steps, 16 if args.quick else 200, 8 if args.quick else 64)
    if embedded_steps:
        print(f"\n{embedded_table(embedded, embedded_steps)}")
    seconds = round(time.perf_counter() - start, 1)
    print(f"({seconds} s)")
    if args.json:
        print(json.dumps({"benchmark": "few_steps", "machine": machine(), "samples": samples, "steps": steps,
                          "quality_steps": quality_steps, "err": err, "ll": ll, "best": best,
                          "composition": composition, "err_spread": spread, "bf16": bf16,
                          "composition_steps": composition_steps, "oracle": oracle,
                          "oracle_ll": oracle_ll,
                          "embedded": embedded,
                          "seconds": seconds}))


def embedded_rows(steps: list[int], digit_samples: int, shape_samples: int) -> dict:
    """The embedded models by step count: digits OR Fréchet distance and classes covered for each
    estimator variance, and the shapes AND both-rate."""
    if not steps:
        return {}
    from superdiff.pipelines import SuperDiffPipeline
    from superdiff.zoo.digits import frechet_distance, load_digits_split
    from superdiff.zoo.registry import embedded_path, load_digit_classifier, load_digit_pipeline
    from superdiff.zoo.shapes import read_attributes

    classifier = load_digit_classifier("cpu")
    with torch.no_grad():
        real = classifier.features(load_digits_split().test_images)
    digits = load_digit_pipeline(("a", "b"))
    shapes = SuperDiffPipeline.from_pretrained(embedded_path("shapes"), dtype=torch.float32)
    rows: dict = {"digits OR Fréchet, forward": {}, "digits OR Fréchet, tweedie": {},
                  "digits OR classes ≥ 2%, forward": {}, "digits OR classes ≥ 2%, tweedie": {},
                  "shapes AND both-rate (red + circle), forward": {},
                  "shapes AND both-rate (red + circle), tweedie": {}}
    for n in steps:
        for variance in ("forward", "tweedie"):
            out = digits(batch_size=digit_samples, mode="or", num_inference_steps=n, output_type="pt", progress=False,
                         generator=torch.Generator().manual_seed(0), density_variance=variance)
            images = out.images.float() * 2 - 1  # output_type="pt" is [0, 1]; the classifier reads [−1, 1]
            with torch.no_grad():
                feats, labels = classifier.features(images), classifier(images).argmax(-1)
            fractions = torch.bincount(labels, minlength=10).double() / digit_samples
            rows[f"digits OR Fréchet, {variance}"][n] = round(frechet_distance(feats, real), 2)
            rows[f"digits OR classes ≥ 2%, {variance}"][n] = int((fractions >= 0.02).sum())
            out = shapes(prompts=["red", "circle"], mode="and", guidance_scale=5.0, num_inference_steps=n,
                         num_images_per_prompt=shape_samples, output_type="pt", progress=False,
                         generator=torch.Generator().manual_seed(0), density_variance=variance)
            colours, kinds = read_attributes(out.images.float() * 2 - 1)
            rows[f"shapes AND both-rate (red + circle), {variance}"][n] = round(
                sum(c == "red" and k == "circle" for c, k in zip(colours, kinds)) / shape_samples, 3)
    return rows


def embedded_table(rows: dict, steps: list[int]) -> str:
    head = "| embedded model | " + " | ".join(f"{n} steps" for n in steps) + " |"
    lines = [head, "|---|" + "---|" * len(steps)]
    lines += [f"| {name} | " + " | ".join(str(row[n]) for n in steps) + " |" for name, row in rows.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    from common import markdown_output

    with markdown_output("few_steps"):
        main()
