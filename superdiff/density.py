"""Log-density estimators along sampling trajectories: the Itô estimator (SDE) and Prop. 5 (ODE).

SDE steps go from a noisier time s to a cleaner time t < s. Both the step and the estimator use
Gaussian transition kernels (App. D):

* the forward kernel (Prop. 10) ``k(x_s | x_t) = N(a x_t, S² I)``, ``a = α_s/α_t``,
  ``S² = σ_s² − a² σ_t²``;
* the reverse kernel of model i, its Gaussian posterior given the denoised ``x̂₀ⁱ``,
  ``r̃ᵢ(y | x) = N(c_x x + c_0 x̂₀ⁱ, v I)`` with ``c_x = a σ_t²/σ_s²``, ``c_0 = α_t S²/σ_s²``,
  ``v = σ_t² S²/σ_s²``. Its mean equals the Euler step of Thm. 2 exactly; its variance differs
  from Thm. 2's at relative order Δt. It stays finite at α_s = 0 (flow matching at σ = 1).

The estimator is the discrete detailed balance of Eq. 89,
``log q_t(y) − log q_s(x) ≈ −log k(x | y) + log r̃ᵢ(y | x)``, which is Theorem 1 discretised:
to first order in the step it equals Eq. 90 (Prop. 11). It needs the denoised predictions the
sampler already has, and no divergence of any network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "TransitionCoefficients",
    "transition_coefficients",
    "ito_log_density_increment",
    "ito_increment_system",
    "ito_final_step_system",
    "ito_log_density_increment_continuous",
    "ode_log_density_rate",
    "ode_increment_system",
    "divergence_exact",
    "divergence_hutchinson",
    "divergence_hutchinson_vjp",
]


@dataclass(frozen=True)
class TransitionCoefficients:
    """Scalars of one reverse step from time s (noisier) to t; see the module docstring."""

    alpha_s: float
    sigma_s: float
    alpha_t: float
    sigma_t: float
    a: float
    S2: float
    c_x: float
    c_0: float
    var: float

    @property
    def final(self) -> bool:
        """A step onto σ_t = 0: the posterior collapses to the denoised mean; no density exists there."""
        return self.sigma_t == 0.0


VARIANCES = ("euler", "forward", "posterior")


def transition_coefficients(
    alpha_s: float, sigma_s: float, alpha_t: float, sigma_t: float, variance: str = "forward"
) -> TransitionCoefficients:
    """Coefficients of the forward kernel and of the Gaussian reverse kernel, in float64.

    The reverse mean ``c_x x + c_0 x̂₀`` is Tweedie's exact ``E[x_t | x_s]``; the variance is one
    of three first-order-equivalent choices: ``"euler"`` ``S²/a²`` (Thm. 2), ``"forward"`` ``S²``
    (DDPM's β), ``"posterior"`` ``σ_t² S²/σ_s²`` (DDPM's β̃). Where ``a = 0`` (α_s = 0) the
    Euler variance is infinite and the posterior one is used.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if not (sigma_s > 0):
        raise ValueError(f"a reverse step needs σ_s > 0 at its start, got {sigma_s}")
    if not (alpha_t > 0):
        raise ValueError(f"a reverse step needs α_t > 0 at its end, got {alpha_t}")
    a = alpha_s / alpha_t
    s2 = sigma_s * sigma_s - (a * sigma_t) ** 2
    if not (s2 > 0):
        raise ValueError(
            f"times must decrease in noise: the step from (α={alpha_s}, σ={sigma_s}) to (α={alpha_t}, σ={sigma_t}) "
            "has no positive forward variance"
        )
    inv = 1.0 / (sigma_s * sigma_s)
    if sigma_t == 0.0:
        var = 0.0
    elif variance == "euler" and a > 0:
        var = s2 / (a * a)
    elif variance == "forward":
        var = s2
    else:
        var = sigma_t * sigma_t * s2 * inv
    return TransitionCoefficients(
        alpha_s=alpha_s,
        sigma_s=sigma_s,
        alpha_t=alpha_t,
        sigma_t=sigma_t,
        a=a,
        S2=s2,
        c_x=a * sigma_t * sigma_t * inv,
        c_0=alpha_t * s2 * inv,
        var=var,
    )


def _bdot(a: Tensor, b: Tensor) -> Tensor:
    """Inner product over the last dim of float64 tensors with broadcasting."""
    return torch.linalg.vecdot(a, b)


def ito_log_density_increment(
    denoised: Tensor,
    denoised_mix: Tensor,
    x: Tensor,
    noise: Tensor,
    coef: TransitionCoefficients,
) -> Tensor:
    """Itô estimate of ``log qᵢ_t(y) − log qᵢ_s(x)`` for the step ``y = c_x x + c_0 x̂₀ᵐⁱˣ + w``.

    ``denoised``: (M, B, *shape) each model's x̂₀ at x; ``denoised_mix``: (B, *shape) the x̂₀ that
    drove the step; ``noise``: (B, *shape) the Gaussian increment w actually added (variance
    ``V = coef.var``). Returns (B, M) in float64. Expanded (with ε̂ = (x − α_s x̂₀)/σ_s and
    ``gapᵢ = x̂₀ᵐⁱˣ − x̂₀ⁱ``)::

        Δᵢ = S²/(2σ_s²) ‖ε̂ᵐⁱˣ‖² − a/σ_s ⟨ε̂ᵐⁱˣ, w⟩ + (a²/S² − 1/V) ‖w‖²/2 + d/2 log(S²/V)
             − c_0/V ⟨gapᵢ, w⟩ − c_0²/(2V) ‖gapᵢ‖²
    """
    batch = x.shape[0]
    x0 = denoised.reshape(denoised.shape[0], batch, -1).to(torch.float64)
    x0_mix = denoised_mix.reshape(batch, -1).to(torch.float64)
    w = noise.reshape(batch, -1).to(torch.float64)
    xf = x.reshape(batch, -1).to(torch.float64)
    d = xf.shape[-1]
    c = coef
    eps_mix = (xf - c.alpha_s * x0_mix) / c.sigma_s
    common = (
        c.S2 / (2 * c.sigma_s**2) * _bdot(eps_mix, eps_mix)
        - c.a / c.sigma_s * _bdot(eps_mix, w)
        + 0.5 * (c.a * c.a / c.S2 - 1.0 / c.var) * _bdot(w, w)
        + 0.5 * d * math.log(c.S2 / c.var)
    )
    gap = x0_mix[None] - x0  # (M, B, d)
    specific = -c.c_0 / c.var * _bdot(gap, w[None]) - c.c_0**2 / (2 * c.var) * _bdot(gap, gap)
    return (common[None] + specific).transpose(0, 1)


def ito_increment_system(
    denoised: Tensor,
    base: Tensor,
    scale: float,
    noise: Tensor,
    coef: TransitionCoefficients,
) -> tuple[Tensor, Tensor]:
    """The AND system (Eqs. 75–77) for :func:`ito_log_density_increment`.

    With the mixed prediction ``x̂₀ᵐⁱˣ(κ) = base + scale Σⱼ κⱼ (x̂₀ʲ − base)`` and ``Σκ = 1``,
    ``Δᵢ(κ) = Σⱼ Aᵢⱼ κⱼ + bᵢ + c(κ)`` with, for ``eᵢ = x̂₀ⁱ − base`` and ``K = α_t² S²/(2σ_s²σ_t²)``,

        Aᵢⱼ = 2 K scale ⟨eᵢ, eⱼ⟩,     bᵢ = α_t/σ_t² ⟨eᵢ, w⟩ − K ‖eᵢ‖².

    ``base`` is the unconditional x̂₀ under guidance, else any common point. Returns (A, b) as
    ((B, M, M), (B, M)) float64, in nats for this step. (Here K = c_0²/(2V) and the factor of
    ⟨eᵢ, w⟩ is c_0/V, for any choice of the kernel variance V.)
    """
    e = _offsets(denoised, base)
    w = noise.reshape(base.shape[0], -1).to(torch.float64)
    c = coef
    k = c.c_0**2 / (2 * c.var)
    gram = e @ e.transpose(1, 2)
    a_mat = 2 * k * scale * gram
    b_vec = c.c_0 / c.var * (e @ w[:, :, None])[..., 0] - k * torch.diagonal(gram, dim1=1, dim2=2)
    return a_mat, b_vec


def ito_final_step_system(denoised: Tensor, base: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The AND system of a last, deterministic step onto σ = 0, where ``y = x̂₀ᵐⁱˣ``.

    No density increment is finite there: as the kernel variance V → 0, the model-specific part of
    :func:`ito_log_density_increment` is dominated by ``−c_0²/(2V) ‖x̂₀ᵐⁱˣ − x̂₀ⁱ‖²``, and the
    system of :func:`ito_increment_system` divided by ``c_0²/V`` tends to this one:
    ``−½‖x̂₀ᵐⁱˣ(κ) − x̂₀ⁱ‖² = Σⱼ Aᵢⱼ κⱼ + bᵢ + c(κ)`` with ``Aᵢⱼ = scale ⟨eᵢ, eⱼ⟩`` and
    ``bᵢ = −½‖eᵢ‖²``. Equal values put the step equally far from every model's prediction (for two
    models without guidance, midway). Not in nats: AND's κ does not depend on the system's scale.
    """
    e = _offsets(denoised, base)
    gram = e @ e.transpose(1, 2)
    return scale * gram, -0.5 * torch.diagonal(gram, dim1=1, dim2=2)


def _offsets(denoised: Tensor, base: Tensor) -> Tensor:
    """``eᵢ = x̂₀ⁱ − base`` per sample, as (B, M, d) float64."""
    batch = base.shape[0]
    e = denoised.reshape(denoised.shape[0], batch, -1).to(torch.float64) - base.reshape(batch, -1).to(torch.float64)[None]
    return e.transpose(0, 1)


def ito_log_density_increment_continuous(
    score: Tensor,
    x: Tensor,
    dx: Tensor,
    drift_coefficient: float,
    diffusion_squared: float,
    dt: float,
) -> Tensor:
    """Theorem 1 / Eq. 90 in its plain Euler–Maruyama form, for reference and for users' own loops.

    ``d log q = d·dt·∂_t log α − dt g²/2 ‖∇log q‖² + ⟨dx + dt ∂_t log α · x, ∇log q⟩``, with
    ``score`` (M, B, *shape) = ∇log qᵢ at the pre-step x, ``dx`` the step taken and ``dt > 0`` the
    reverse-time step. Returns (B, M) float64.
    """
    batch = x.shape[0]
    s = score.reshape(score.shape[0], batch, -1).to(torch.float64)
    xf = x.reshape(batch, -1).to(torch.float64)
    step = dx.reshape(batch, -1).to(torch.float64) + dt * drift_coefficient * xf
    d = xf.shape[-1]
    out = d * dt * drift_coefficient - dt * diffusion_squared / 2 * _bdot(s, s) + _bdot(s, step[None])
    return out.transpose(0, 1)


# ----------------------------------------------------------------------------------------------
# Probability-flow ODE (Prop. 5). Velocities in forward time t: vᵢ = α̇ x̂₀ⁱ + σ̇ ε̂ⁱ.
# ----------------------------------------------------------------------------------------------


def ode_log_density_rate(
    denoised: Tensor,
    denoised_mix: Tensor,
    divergence_denoised: Tensor,
    x: Tensor,
    alpha: float,
    sigma: float,
    d_alpha: float,
    d_sigma: float,
) -> Tensor:
    """Prop. 5: ``d/dt log qᵢ(x(t)) = −∇·vᵢ − ⟨∇log qᵢ, vᵢ − u⟩`` along ``dx/dt = u``.

    ``u`` is the mixed velocity built from ``denoised_mix``; ``divergence_denoised`` (M, B) is
    ``∇_x · x̂₀ⁱ`` (exact or Hutchinson). Uses ``∇·vᵢ = d σ̇/σ + (α̇ − σ̇ α/σ) ∇·x̂₀ⁱ`` and
    ``vᵢ − u = (α̇ − σ̇ α/σ)(x̂₀ⁱ − x̂₀ᵐⁱˣ)``. Returns (B, M) float64 per unit time.
    """
    batch = x.shape[0]
    x0 = denoised.reshape(denoised.shape[0], batch, -1).to(torch.float64)
    x0_mix = denoised_mix.reshape(batch, -1).to(torch.float64)
    xf = x.reshape(batch, -1).to(torch.float64)
    d = xf.shape[-1]
    rate = d_alpha - d_sigma * alpha / sigma
    score = -(xf[None] - alpha * x0) / (sigma * sigma)
    div_v = d * d_sigma / sigma + rate * divergence_denoised.to(torch.float64)
    out = -div_v - rate * _bdot(score, x0 - x0_mix[None])
    return out.transpose(0, 1)


def ode_increment_system(
    denoised: Tensor,
    base: Tensor,
    scale: float,
    divergence_denoised: Tensor,
    x: Tensor,
    alpha: float,
    sigma: float,
    d_alpha: float,
    d_sigma: float,
) -> tuple[Tensor, Tensor]:
    """The AND system for :func:`ode_log_density_rate` per unit time, with
    ``x̂₀ᵐⁱˣ(κ) = base + scale Σⱼ κⱼ (x̂₀ʲ − base)``: ``rateᵢ = Σⱼ Aᵢⱼ κⱼ + bᵢ``."""
    batch = x.shape[0]
    x0 = denoised.reshape(denoised.shape[0], batch, -1).to(torch.float64)
    basef = base.reshape(batch, -1).to(torch.float64)
    xf = x.reshape(batch, -1).to(torch.float64)
    d = xf.shape[-1]
    rate = d_alpha - d_sigma * alpha / sigma
    score = (-(xf[None] - alpha * x0) / (sigma * sigma)).transpose(0, 1)  # (B, M, d)
    e = (x0 - basef[None]).transpose(0, 1)  # (B, M, d)
    div_v = d * d_sigma / sigma + rate * divergence_denoised.to(torch.float64).transpose(0, 1)
    a_mat = rate * scale * (score @ e.transpose(1, 2))  # −rate⟨sᵢ, eᵢ − scale Σⱼκⱼeⱼ⟩ gives +rate·scale⟨sᵢ, eⱼ⟩κⱼ
    b_vec = -div_v - rate * _bdot(score, x0.transpose(0, 1) - basef[:, None])
    return a_mat, b_vec


def divergence_exact(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """``fn(x)`` and the exact ``∇_x · fnᵢ(x)`` for ``fn: (B, *shape) -> (M, B, *shape)``.

    One JVP per dimension, so only for small dimensions. Returns (value, (M, B) float64).
    """
    batch = x.shape[0]
    d = x[0].numel()
    value, total = None, None
    for k in range(d):
        tangent = torch.zeros(batch, d, dtype=x.dtype, device=x.device)
        tangent[:, k] = 1.0
        out, jvp = torch.func.jvp(fn, (x,), (tangent.reshape(x.shape),))
        value = out if value is None else value
        term = jvp.reshape(jvp.shape[0], batch, d)[..., k].to(torch.float64)
        total = term if total is None else total + term
    assert value is not None and total is not None
    return value, total


def divergence_hutchinson(fn: Callable[[Tensor], Tensor], x: Tensor, probe: Tensor) -> tuple[Tensor, Tensor]:
    """``fn(x)`` and the Hutchinson estimate ``εᵀ (∂fnᵢ/∂x) ε`` for a probe ε, one JVP for all i.

    The probe should be Rademacher (±1), shaped like x. Returns (value, (M, B) float64).
    """
    batch = x.shape[0]
    value, jvp = torch.func.jvp(fn, (x,), (probe.to(x.dtype),))
    estimate = (jvp.reshape(jvp.shape[0], batch, -1).to(torch.float64) * probe.reshape(1, batch, -1).to(torch.float64)).sum(-1)
    return value, estimate


def divergence_hutchinson_vjp(fn: Callable[[Tensor], Tensor], x: Tensor, probe: Tensor) -> tuple[Tensor, Tensor]:
    """The same estimate as :func:`divergence_hutchinson` through reverse mode: ``(εᵀ Jᵢ) ε``.

    One forward pass, then one vector–Jacobian product per output (vectorised with vmap). On CPU
    convolutions a VJP is several times cheaper than a JVP. Returns (value, (M, B) float64).
    """
    value, vjp_fn = torch.func.vjp(fn, x)
    m = value.shape[0]
    eye = torch.eye(m, dtype=value.dtype, device=value.device).reshape(m, m, *([1] * (value.dim() - 1)))
    cotangents = eye * probe.to(value.dtype)[None, None]  # (M, M, B, *shape): output i gets the probe
    (rows,) = torch.func.vmap(vjp_fn)(cotangents)  # (M, B, *shape): εᵀ Jᵢ
    batch = x.shape[0]
    estimate = (rows.reshape(m, batch, -1).to(torch.float64) * probe.reshape(1, batch, -1).to(torch.float64)).sum(-1)
    return value, estimate
