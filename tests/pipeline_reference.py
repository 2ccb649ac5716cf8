"""The independent reference loop the pipeline tests (tests/test_pipelines_*.py) compare against.

The central check: each pipeline's κ and log-density traces agree with an independent,
straightforward loop written here, which calls the network once per prompt plus once
unconditionally (as the authors' code does), reads σ and α straight from the scheduler's tables,
and evaluates the estimator as the Gaussian log-densities it is defined by (density.py):

    Δᵢ = log N(y; c_x x + c_0 x̂₀ⁱ, Vᵢ) − log N(x; a y, S²),

with a = α_s/α_t, S² = σ_s² − a²σ_t², c_x = aσ_t²/σ_s², c_0 = α_t S²/σ_s², and the step
y = c_x x + c_0 x̂₀ᵐⁱˣ + w, w ~ N(0, β̃), β̃ = σ_t² S²/σ_s². Vᵢ is the pipelines' default
``density_variance="tweedie"``: β̃ + c_0² (σ_s²/α_s) λᵢ, λᵢ = ⟨uᵢ, x̂₀ⁱ(x) − x̂₀ⁱ(x_prev)⟩/‖uᵢ‖² ≥ 0 from
the previous step's residual uᵢ = y_prev − (c_x x_prev + c_0 x̂₀ⁱ(x_prev)); on the first step (and
where α_s = 0) the forward variance S²(α_t² + σ_t²)/(α_s² + σ_s²). With ``density_variance="forward"``
that variance on every step. AND's κ is solved here from Δᵢ − Δⱼ = 0: with one variance for all
models the common k-term cancels and the condition is linear in y (hence in κ), solved as a
bordered linear system; with one per model it is not, and Newton's method on the Gaussian
log-densities themselves, with torch.autograd's Jacobian, starts from that linear solution.
"""

from __future__ import annotations

import math

import torch

STEPS = 4
PROMPTS = ["a red circle", "a blue square"]


def gaussian_log_pdf(y: torch.Tensor, mean: torch.Tensor, var) -> torch.Tensor:
    """Row-wise log N(y; mean, var I) of flattened (B, d) float64 tensors; var a number or one per row."""
    d = y.shape[-1]
    var = torch.as_tensor(var, dtype=torch.float64)
    return -((y - mean) ** 2).sum(-1) / (2 * var) - 0.5 * d * torch.log(2 * math.pi * var)


def equal_density_newton(increments, kappa0: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """κ with Σκ = 1 and equal ``increments(κ)`` (M,), by Newton's method from ``kappa0`` with
    torch.autograd's Jacobian of the free coordinates κ₁ … κ_{M−1}."""
    m = kappa0.shape[0]

    def gaps(free: torch.Tensor) -> torch.Tensor:
        kappa = torch.cat([free, 1 - free.sum(0, keepdim=True)])
        delta = increments(kappa)
        return delta[:-1] - delta[-1]

    free = kappa0[:-1].clone()
    for _ in range(iterations):
        value = gaps(free)
        if float(value.abs().max()) < 1e-11:
            break
        jac = torch.autograd.functional.jacobian(gaps, free).reshape(m - 1, m - 1)
        free = free - torch.linalg.solve(jac, value)
    return torch.cat([free, 1 - free.sum(0, keepdim=True)])


def reference_loop(denoise, grid, x, generator, mode, w, temperature=1.0, log_weights=None, states=None,
                   density_variance="tweedie"):
    """Algorithm 1, plainly. ``denoise(x, step, k)`` → x̂₀ of condition k (k = M is the
    unconditional one), ONE network call per condition. ``grid``: [(α, σ)] per time, the last σ = 0.

    ``states``: the pipeline's states after each step (from its callback). The loop still makes
    its own step, but continues from the pipeline's state (after checking they agree), so float
    rounding (batched vs per-prompt convolutions) cannot compound through AND's ratio of small
    differences; every κ and Δ is then compared at the same point.

    Returns (samples, log_density_trace (steps+1, B, M), kappa_trace (steps, B, M)).
    """
    batch = x.shape[0]
    m = denoise.num_prompts
    log_q = torch.zeros(batch, m, dtype=torch.float64)
    lw = torch.zeros(m, dtype=torch.float64) if log_weights is None else torch.tensor(log_weights, dtype=torch.float64)
    log_trace, kappa_trace = [log_q], []
    kappa = torch.full((batch, m), 1.0 / m, dtype=torch.float64)
    steps = len(grid) - 1
    previous = None  # "tweedie": each prompt's x̂₀ⁱ and residual uᵢ of the previous step, (M, B, d)
    for i in range(steps):
        (alpha_s, sigma_s), (alpha_t, sigma_t) = grid[i], grid[i + 1]
        x0 = torch.stack([denoise(x, i, k).reshape(batch, -1).double() for k in range(m)])  # (M, B, d)
        xf = x.reshape(batch, -1).double()
        # guided: x̂₀ᵐⁱˣ = x̂₀ᵘ + w(Σκx̂₀ʲ − Σκ x̂₀ᵘ); unguided: Σκx̂₀ʲ + (1 − Σκ) x/α (a zero score's x̂₀).
        # Unguided, base only shifts AND's system, whose y(κ) does not depend on it when Σκ = 1; a base
        # near the x̂₀ⁱ (their mean) keeps float64 from cancelling ‖x̂₀‖² away, as x̂₀ᵘ does when guided.
        base, scale = (denoise(x, i, m).reshape(batch, -1).double(), w) if w is not None else (x0.mean(0), 1.0)
        final = sigma_t == 0.0
        a = alpha_s / alpha_t
        s2 = sigma_s**2 - (a * sigma_t) ** 2
        c_x, c_0 = a * sigma_t**2 / sigma_s**2, alpha_t * s2 / sigma_s**2
        var = sigma_t**2 * s2 / sigma_s**2  # the step's kernel: DDPM's β̃ (the samplers' default)
        var_est = s2 * (alpha_t**2 + sigma_t**2) / (alpha_s**2 + sigma_s**2)  # the estimator's: β in the VP frame
        if not final:
            noise = math.sqrt(var) * torch.randn(x.shape, generator=generator).to(x.dtype)  # drawn in float32
            wf = noise.reshape(batch, -1).double()
            var_k = torch.full((m, batch), var_est, dtype=torch.float64)  # each prompt's estimator variance
            if density_variance == "tweedie" and previous is not None and alpha_s > 0:
                prev_x0, prev_u = previous
                lam = ((prev_u * (x0 - prev_x0)).sum(-1) / (prev_u * prev_u).sum(-1)).clamp_min(0.0)
                var_k = var + c_0**2 * sigma_s**2 / alpha_s * lam
        if mode == "or":
            kappa = torch.softmax(temperature * log_q + lw, dim=-1)
        elif mode == "average":
            kappa = torch.full((batch, m), 1.0 / m, dtype=torch.float64)
        elif mode == "sum":
            kappa = torch.ones(batch, m, dtype=torch.float64)
        elif mode == "and":
            # Model i's Δᵢ is, up to terms common to all models, (⟨y(κ), μᵢ⟩ − ‖μᵢ‖²/2)/V with
            # y(κ) = y0 + gain Σⱼ κⱼ (x̂₀ʲ − base) the step's end point and μᵢ its kernel mean. Onto σ = 0
            # (final) that limit is −‖x̂₀ᵐⁱˣ(κ) − x̂₀ⁱ‖²/2: y = x̂₀ᵐⁱˣ, μᵢ = x̂₀ⁱ, both shifted by −base
            # (which changes only common terms, and keeps float64 from cancelling ‖x̂₀‖² away).
            if final:
                y0, mu, gain, v = torch.zeros_like(base), x0 - base[None], scale, 1.0
            else:
                y0, mu, gain, v = c_x * xf + c_0 * base + wf, c_x * xf[None] + c_0 * x0, c_0 * scale, var_est
            kappa = torch.empty(batch, m, dtype=torch.float64)
            for b in range(batch):
                lhs = torch.zeros(m + 1, m + 1, dtype=torch.float64)
                rhs = torch.zeros(m + 1, dtype=torch.float64)
                for r in range(m):
                    for j in range(m):
                        lhs[r, j] = gain * torch.dot(x0[j, b] - base[b], mu[r, b]) / v
                    lhs[r, m] = -1.0
                    rhs[r] = -(torch.dot(y0[b], mu[r, b]) - 0.5 * torch.dot(mu[r, b], mu[r, b])) / v
                lhs[m, :m] = 1.0
                rhs[m] = 1.0
                kappa[b] = torch.linalg.solve(lhs, rhs)[:m]
                if not final and not bool((var_k[:, b] == var_k[0, b]).all()):

                    def increments(kap, b=b):
                        mixed = (kap[:, None] * x0[:, b]).sum(0)
                        x0_kap = base[b] + scale * (mixed - kap.sum() * base[b]) if w is not None else mixed
                        y_kap = c_x * xf[b] + c_0 * x0_kap + wf[b]
                        return torch.stack([gaussian_log_pdf(y_kap, c_x * xf[b] + c_0 * x0[k, b], var_k[k, b])
                                            for k in range(m)]) - gaussian_log_pdf(xf[b], a * y_kap, s2)

                    kappa[b] = equal_density_newton(increments, kappa[b])
        total = kappa.sum(-1)[:, None]
        if w is not None:
            x0_mix = base + w * ((kappa.T[:, :, None] * x0).sum(0) - total * base)
        else:
            x0_mix = (kappa.T[:, :, None] * x0).sum(0)
            if mode == "sum":  # κ that sum to 1 (the other modes) need no zero-score term; flow starts at α = 0
                x0_mix = x0_mix + (1 - total) * xf / alpha_s
        if final:
            x = x0_mix.to(x.dtype).reshape(x.shape)
        else:
            y = c_x * xf + c_0 * x0_mix + wf
            delta = torch.stack(
                [
                    gaussian_log_pdf(y, c_x * xf + c_0 * x0[k], var_k[k]) - gaussian_log_pdf(xf, a * y, s2)
                    for k in range(m)
                ],
                -1,
            )
            log_q = log_q + delta
            previous = (x0, y[None] - (c_x * xf[None] + c_0 * x0))
            x = y.to(x.dtype).reshape(x.shape)
            if states is not None:
                torch.testing.assert_close(x, states[i], rtol=1e-5, atol=1e-5 * (1 + float(x.abs().max())))
                x = states[i]
        log_trace.append(log_q)
        kappa_trace.append(kappa.clone())
    return x, torch.stack(log_trace), torch.stack(kappa_trace)


class PerConditionDenoiser:
    """Wraps ``x0(x, step, embedding_index)`` with the number of prompts."""

    def __init__(self, fn, num_prompts):
        self.fn, self.num_prompts = fn, num_prompts

    def __call__(self, x, step, k):
        return self.fn(x, step, k)


def assert_traces_match(out, ref_samples, ref_log, ref_kappa, samples, rtol):
    scale = 1.0 + float(ref_log.abs().max())
    assert out.log_density_trace.shape == ref_log.shape
    assert out.kappa_trace.shape == ref_kappa.shape
    torch.testing.assert_close(out.log_density_trace, ref_log, rtol=0, atol=rtol * scale)
    torch.testing.assert_close(
        out.kappa_trace.double(), ref_kappa, rtol=rtol, atol=rtol * (1 + float(ref_kappa.abs().max()))
    )
    torch.testing.assert_close(
        samples.double(), ref_samples.double(), rtol=0, atol=10 * rtol * (1 + float(ref_samples.abs().max()))
    )


def count_calls(module):
    """Count forward calls of a module (a pre-hook; returns the list whose length is the count)."""
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)

def run_with_states(pipe, *args, **kwargs):
    """Call the pipeline, recording its state after every step."""
    states = []
    out = pipe(*args, callback_on_step_end=lambda p, i, t, kw: states.append(kw["latents"].clone()), **kwargs)
    return out, states
