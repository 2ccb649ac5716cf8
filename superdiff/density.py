"""Log-density estimators along sampling trajectories: the Itô estimator (SDE) and Prop. 5 (ODE).

SDE steps go from a noisier time s to a cleaner time t < s. Both the step and the estimator use
Gaussian transition kernels (App. D):

* the forward kernel (Prop. 10) ``k(x_s | x_t) = N(a x_t, S² I)``, ``a = α_s/α_t``,
  ``S² = σ_s² − a² σ_t²``;
* the reverse kernel of model i, a Gaussian around Tweedie's ``E[x_t | x_s]`` given the denoised
  ``x̂₀ⁱ``, ``r̃ᵢ(y | x) = N(c_x x + c_0 x̂₀ⁱ, V I)`` with ``c_x = a σ_t²/σ_s²``, ``c_0 = α_t S²/σ_s²``.
  Its mean equals the Euler step of Thm. 2 exactly; every variance V offered differs from Thm. 2's
  at relative order Δt. It stays finite at α_s = 0 (flow matching at σ = 1).

The step and the estimator need not use the same V. Eq. 89 holds exactly for each model's true
reverse kernel whatever point y the step reached, so the estimator's r̃ᵢ should approximate that
kernel, while the step's V decides the samples. By default steps use the posterior variance
``σ_t² S²/σ_s²`` (DDPM's β̃, diffusers' ancestral samplers), the exact reverse kernel of a point
mass, which keeps few-step samples clean. Among the variances common to all models the
estimator's is the forward variance in the variance-preserving frame ``S² (α_t² + σ_t²)/(α_s² +
σ_s²)`` (DDPM's β on VP processes); by default it uses each model's own
(:func:`tweedie_density_variance`), its exact transition's variance to first order, with which
AND's condition is quadratic in κ (:func:`ito_quadratic_increment_system`). The measurements
behind these choices are in ``bench/variance.py`` and ``bench/few_steps.py``.

The estimator is the discrete detailed balance of Eq. 89,
``log q_t(y) − log q_s(x) ≈ −log k(x | y) + log r̃ᵢ(y | x)``, which is Theorem 1 discretised:
to first order in the step it equals Eq. 90 (Prop. 11). It needs the denoised predictions the
sampler already has, and no divergence of any network.

**One estimator for every mode, with Theorem 1's sign.** To first order the increment's quadratic
term is ``−(g²/2)‖∇log qᵢ‖² dt``, the sign the authors' AND branch uses. Their released Stable
Diffusion OR branch (``clip_eval.py``) flips it to ``+``: each prompt's log-density then grows where
its score is large rather than where its density is, and κ no longer follows the mixture's
posterior over prompts (Prop. 4 needs the true qᵢ). We follow the theorem, so OR and AND read the
same tracked densities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ._numeric import f64
from .options import DEFAULT_DENSITY_VARIANCE, KERNEL_VARIANCES

__all__ = [
    "DEFAULT_DENSITY_VARIANCE",
    "TransitionCoefficients",
    "transition_coefficients",
    "ito_log_density_increment",
    "model_residuals",
    "jacobian_rayleigh_quotient",
    "tweedie_density_variance",
    "ito_increment_system",
    "QuadraticIncrementSystem",
    "ito_quadratic_increment_system",
    "StepMoments",
    "step_moments",
    "expected_step_moments",
    "ito_final_step_system",
    "ode_log_density_rate",
    "ode_increment_system",
    "divergence_exact",
    "divergence_hutchinson",
    "divergence_hutchinson_vjp",
]


@dataclass(frozen=True)
class TransitionCoefficients:
    """Scalars of one reverse step from time s (noisier) to t; see the module docstring.

    ``var``: the variance of the step's Gaussian increment w; ``density_var``: the variance of the
    reverse kernels r̃ᵢ with which the estimator scores that step (0 on a step onto σ = 0).
    """

    alpha_s: float
    sigma_s: float
    alpha_t: float
    sigma_t: float
    a: float
    S2: float
    c_x: float
    c_0: float
    var: float
    density_var: float

    @property
    def final(self) -> bool:
        """A step onto σ_t = 0: the posterior collapses to the denoised mean; no density exists there."""
        return self.sigma_t == 0.0


#: The kernel variances by name, and the estimator's default (each model's own,
#: :func:`tweedie_density_variance`): declared with the sampling options (:mod:`superdiff.options`).
VARIANCES = KERNEL_VARIANCES


def reverse_kernel_variance(alpha_s: float, sigma_s: float, alpha_t: float, sigma_t: float, variance: str) -> float:
    """The variance V of a Gaussian reverse kernel from (α_s, σ_s) to (α_t, σ_t).

    Three first-order-equivalent choices, each the same kernel whatever scale the process gives x
    (Stable Diffusion's σ-form and its VP form agree):

    * ``"posterior"`` ``σ_t² S²/σ_s²`` (DDPM's β̃): the exact reverse kernel when the data is a point;
    * ``"forward"`` ``S² n_t²/n_s²`` with ``n² = α² + σ²``: the forward kernel's variance carried to
      time t in the variance-preserving frame (DDPM's β; equal to S² on VP processes). In the σ-form
      frame the bare S² is Thm. 2's variance of the VP form, which is why it left 8-step images noisy;
    * ``"euler"`` ``S²/a²`` (Thm. 2): one Euler step of the reverse SDE; it needs α_s > 0.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    a = alpha_s / alpha_t
    s2 = sigma_s * sigma_s - (a * sigma_t) ** 2
    if variance == "posterior":
        return sigma_t * sigma_t * s2 / (sigma_s * sigma_s)
    if variance == "forward":
        return s2 * (alpha_t * alpha_t + sigma_t * sigma_t) / (alpha_s * alpha_s + sigma_s * sigma_s)
    if not (a > 0):
        raise ValueError(
            "variance='euler' (Thm. 2's S²/a²) is infinite where α_s = 0 (e.g. rectified flow at t = 1); "
            "use 'posterior' or 'forward'"
        )
    return s2 / (a * a)


def transition_coefficients(
    alpha_s: float,
    sigma_s: float,
    alpha_t: float,
    sigma_t: float,
    variance: str = "posterior",
    density_variance: str = "forward",
) -> TransitionCoefficients:
    """Coefficients of the forward kernel and of the Gaussian reverse kernels, in float64.

    The reverse mean ``c_x x + c_0 x̂₀`` is Tweedie's exact ``E[x_t | x_s]``. ``variance`` names the
    step's kernel variance and ``density_variance`` the estimator's (:func:`reverse_kernel_variance`).
    """
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
    final = sigma_t == 0.0  # onto σ = 0 the step is deterministic and scores nothing
    var = reverse_kernel_variance(alpha_s, sigma_s, alpha_t, sigma_t, variance)
    density_var = reverse_kernel_variance(alpha_s, sigma_s, alpha_t, sigma_t, density_variance)
    return TransitionCoefficients(
        alpha_s=alpha_s,
        sigma_s=sigma_s,
        alpha_t=alpha_t,
        sigma_t=sigma_t,
        a=a,
        S2=s2,
        c_x=a * sigma_t * sigma_t * inv,
        c_0=alpha_t * s2 * inv,
        var=0.0 if final else var,
        density_var=0.0 if final else density_var,
    )


def _bdot(a: Tensor, b: Tensor) -> Tensor:
    """Inner product over the last dim of float64 tensors with broadcasting."""
    return torch.linalg.vecdot(a, b)


def _gaussian_log_pdf(residual: Tensor, var: float | Tensor, norm2: Tensor | None = None) -> Tensor:
    """``log N(r; 0, var I)`` of residuals (..., d), in float64; ``var`` a number or one per residual;
    ``norm2`` ‖r‖², where the caller has it."""
    d = residual.shape[-1]
    norm2 = _bdot(residual, residual) if norm2 is None else norm2
    if isinstance(var, Tensor):  # the same sum as below, with its quotient in one fused operation
        return torch.addcdiv(-0.5 * d * (math.log(2 * math.pi) + torch.log(var)), norm2, var, value=-0.5)
    return -0.5 * norm2 / var - 0.5 * d * (math.log(2 * math.pi) + math.log(var))


def model_residuals(denoised: Tensor, denoised_mix: Tensor, noise: Tensor, coef: TransitionCoefficients) -> Tensor:
    """Each model's residual ``uᵢ = y − E_r̃ᵢ[y] = c_0 (x̂₀ᵐⁱˣ − x̂₀ⁱ) + w`` of the step, (M, B, d) float64."""
    batch = denoised_mix.shape[0]
    x0 = f64(denoised.reshape(denoised.shape[0], batch, -1))
    w = f64(noise.reshape(batch, -1))
    return coef.c_0 * (f64(denoised_mix.reshape(batch, -1))[None] - x0) + w[None]


def jacobian_rayleigh_quotient(residual: Tensor, denoised_before: Tensor, denoised_after: Tensor,
                               residual_norm2: Tensor | None = None) -> Tensor:
    """A free estimate of ``tr(∂x̂₀ⁱ/∂x)/d`` at the end of a step, per model and sample, (M, B).

    ``λ̂ᵢ = ⟨uᵢ, x̂₀ⁱ(y) − x̂₀ⁱ(x)⟩ / ‖uᵢ‖²``, clamped at 0, from the step's own residual
    (:func:`model_residuals`) and each model's x̂₀ before and after it (the next step's network call
    gives the second). Under model i's reverse process x̂₀ⁱ(x_t) is a martingale, so the drift and
    the change of time cancel to first order and ``x̂₀ⁱ(y) − x̂₀ⁱ(x) ≈ Jᵢ uᵢ``: λ̂ is the Rayleigh
    quotient of Jᵢ along the isotropic Gaussian uᵢ, whose mean is ``tr Jᵢ / d``; dividing by ‖uᵢ‖²
    rather than its expectation removes the χ² noise. No network evaluation is added. ``residual_norm2``:
    ‖uᵢ‖² (M, B), where the caller kept it from the step's density increment.
    """
    batch = residual.shape[1]
    delta = (f64(denoised_after.reshape(denoised_after.shape[0], batch, -1))
             - f64(denoised_before.reshape(denoised_before.shape[0], batch, -1)))
    norm2 = _bdot(residual, residual) if residual_norm2 is None else residual_norm2
    # u = 0 (norm2 = 0) has ⟨u, δ⟩ = 0: any positive divisor gives λ̂ = 0.
    quotient = _bdot(residual, delta) / norm2.clamp_min(torch.finfo(norm2.dtype).tiny)
    return quotient.clamp_min(0.0)


def tweedie_density_variance(coef: TransitionCoefficients, trace_per_dim: Tensor) -> Tensor:
    """Each model's variance of its reverse kernel, ``Vᵢ = β̃ + c_0² Cᵢ``, (M, B) float64.

    Model i's exact transition from x_s is the mixture over x₀ ~ pᵢ(x₀ | x_s) of N(c_x x_s + c_0 x₀, β̃);
    matching its covariance, with Tweedie's second-order identity ``Cov[x₀ | x_s] = (σ_s²/α_s) ∂x̂₀/∂x_s``
    taken isotropic, ``Cᵢ = (σ_s²/α_s) λᵢ`` with λᵢ ≈ ``tr(∂x̂₀ⁱ/∂x_s)/d``
    (:func:`jacobian_rayleigh_quotient`, measured one step late at x_s). β̃ = ``σ_t² S²/σ_s²``.
    """
    beta_tilde = coef.sigma_t * coef.sigma_t * coef.S2 / (coef.sigma_s * coef.sigma_s)
    if not coef.alpha_s > 0:
        return torch.full_like(trace_per_dim, coef.density_var)
    return beta_tilde + coef.c_0 * coef.c_0 * (coef.sigma_s * coef.sigma_s / coef.alpha_s) * trace_per_dim


def ito_log_density_increment(
    denoised: Tensor,
    denoised_mix: Tensor,
    x: Tensor,
    noise: Tensor,
    coef: TransitionCoefficients,
    density_var: Tensor | None = None,
    residuals: Tensor | None = None,
    residual_norm2: Tensor | None = None,
) -> Tensor:
    """Itô estimate of ``log qᵢ_t(y) − log qᵢ_s(x)`` for the step ``y = c_x x + c_0 x̂₀ᵐⁱˣ + w``.

    Eq. 89 as written: ``log r̃ᵢ(y | x) − log k(x | y)``, with r̃ᵢ of variance ``coef.density_var``,
    or ``density_var`` (M, B), one per model and sample (:func:`tweedie_density_variance`).
    ``denoised``: (M, B, *shape) each model's x̂₀ at x; ``denoised_mix``: (B, *shape) the x̂₀ that
    drove the step; ``noise``: (B, *shape) the Gaussian increment w actually added; ``residuals``:
    :func:`model_residuals` of the same step, and ``residual_norm2`` their ‖uᵢ‖² (M, B), where the
    caller has them already. Returns (B, M)
    in float64.
    """
    batch = x.shape[0]
    x0_mix = f64(denoised_mix.reshape(batch, -1))
    w = f64(noise.reshape(batch, -1))
    xf = f64(x.reshape(batch, -1))
    c = coef
    # Both residuals are formed from their parts, not by subtracting from y, so that float64 keeps
    # them exact when they are small beside x: y − E_r̃ᵢ[y] = c_0 (x̂₀ᵐⁱˣ − x̂₀ⁱ) + w, and, since
    # 1 − a c_x = S²/σ_s², x − a y = (S²/σ_s) ε̂ᵐⁱˣ − a w with ε̂ᵐⁱˣ = (x − α_s x̂₀ᵐⁱˣ)/σ_s.
    if residuals is None:
        residuals = model_residuals(denoised, denoised_mix, noise, c)
    var = c.density_var if density_var is None else density_var
    reverse = _gaussian_log_pdf(residuals, var, residual_norm2)  # log r̃ᵢ(y | x), (M, B)
    eps_mix = (xf - c.alpha_s * x0_mix) / c.sigma_s
    forward = _gaussian_log_pdf(c.S2 / c.sigma_s * eps_mix - c.a * w, c.S2)  # log k(x | y), (B,)
    return (reverse - forward[None]).transpose(0, 1)


@dataclass(frozen=True)
class StepMoments:
    """The inner products of one step that AND's systems need, formed once per step (no d-sized work
    after): ``gram`` (B, M, M) ⟨eᵢ, eⱼ⟩ of the offsets ``eᵢ = x̂₀ⁱ − base``, ``offset_noise`` (B, M)
    ⟨eᵢ, w⟩, ``noise_norm2`` (B,) ‖w‖², and ``dim`` d, all float64."""

    gram: Tensor
    offset_noise: Tensor
    noise_norm2: Tensor
    dim: int


def step_moments(denoised: Tensor, base: Tensor, noise: Tensor) -> StepMoments:
    """:class:`StepMoments` of a step from each model's x̂₀ⁱ (M, B, *shape), the common ``base`` and the noise w."""
    e = _offsets(denoised, base)
    w = f64(noise.reshape(base.shape[0], -1))
    return StepMoments(e @ e.transpose(1, 2), (e @ w[:, :, None])[..., 0], _bdot(w, w), e.shape[-1])


def expected_step_moments(moments: StepMoments, noise_var: float | Tensor) -> StepMoments:
    """The step's :class:`StepMoments` averaged over its noise w ~ N(0, noise_var I): ⟨eᵢ, w⟩ → 0 and
    ‖w‖² → d·noise_var (a number, or (B,) one per sample). The systems built from them give each model's
    *expected* increment as a function of κ, so a κ solved from them does not depend on the step's own noise
    (:class:`superdiff.combine.And` with ``feedback``)."""
    norm2 = moments.dim * (f64(noise_var) if isinstance(noise_var, Tensor)
                           else torch.full_like(moments.noise_norm2, noise_var))
    return StepMoments(moments.gram, torch.zeros_like(moments.offset_noise), norm2, moments.dim)


def ito_increment_system(
    denoised: Tensor,
    base: Tensor,
    scale: float,
    noise: Tensor,
    coef: TransitionCoefficients,
    density_var: Tensor | None = None,
    moments: StepMoments | None = None,
) -> tuple[Tensor, Tensor]:
    """The AND system (Eqs. 75–77) for :func:`ito_log_density_increment`.

    With the mixed prediction ``x̂₀ᵐⁱˣ(κ) = base + scale Σⱼ κⱼ (x̂₀ʲ − base)`` and ``Σκ = 1``,
    ``Δᵢ(κ) = Σⱼ Aᵢⱼ κⱼ + bᵢ + c(κ)`` with, for ``eᵢ = x̂₀ⁱ − base``, ``K = c_0²/(2V)`` and V the
    estimator's variance, one for all models: ``coef.density_var``, or ``density_var`` (B,), one
    per sample,

        Aᵢⱼ = 2 K scale ⟨eᵢ, eⱼ⟩,     bᵢ = c_0/V ⟨eᵢ, w⟩ − K ‖eᵢ‖².

    ``base`` is the unconditional x̂₀ under guidance, else any common point; ``moments``: the step's
    :func:`step_moments`, where the caller has them. Returns (A, b) as ((B, M, M), (B, M)) float64, in
    nats for this step. With one variance per model the increments are quadratic in κ:
    :func:`ito_quadratic_increment_system`.
    """
    mo = step_moments(denoised, base, noise) if moments is None else moments
    return _common_variance_system(mo, scale, coef, density_var)


def _common_variance_system(
    mo: StepMoments, scale: float, coef: TransitionCoefficients, density_var: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(A, b) of :func:`ito_increment_system` from the moments: ``A = c_0² scale G / V``,
    ``b = (c_0 / V)(h − (c_0/2) diag G)``, with V ``coef.density_var`` or one per sample (B,)."""
    c0 = coef.c_0
    diagonal = torch.diagonal(mo.gram, dim1=1, dim2=2)
    if density_var is None:
        inverse = 1.0 / coef.density_var
        return (c0 * c0 * scale * inverse) * mo.gram, (c0 * inverse) * (mo.offset_noise - (0.5 * c0) * diagonal)
    return _per_sample_variance_system(mo, scale, coef, f64(density_var).reciprocal()[:, None])


def _per_sample_variance_system(mo: StepMoments, scale: float, coef: TransitionCoefficients,
                                inverse: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_common_variance_system` with one variance per sample, given as its inverse 1/V (B, 1)
    (reciprocal() is 1.0 / V in one operation)."""
    c0 = coef.c_0
    diagonal = torch.diagonal(mo.gram, dim1=1, dim2=2)
    a_mat = (c0 * c0 * scale) * inverse[..., None] * mo.gram
    return a_mat, inverse * (c0 * mo.offset_noise - (0.5 * c0 * c0) * diagonal)


@dataclass(frozen=True)
class QuadraticIncrementSystem:
    """AND's system when every model has its own estimator variance: for Σκ = 1,

        Δᵢ(κ) = Σⱼ Aᵢⱼ κⱼ + bᵢ + rᵢ φ(κ) + c(κ),     φ(κ) = κᵀ Q κ + vᵀ κ,

    one scalar quadratic φ shared by every row, weighted per row by ``row_weights`` r (B, M); A
    ``increment_matrix`` (B, M, M), b ``increment_offset`` (B, M), Q ``phi_matrix`` (B, M, M), v
    ``phi_vector`` (B, M). For a fixed value t of φ the system is linear, so a combiner that solves
    linear systems solves it at t, and t = φ(κ(t)) is one scalar equation
    (:func:`superdiff.sampling.sample_sde` solves it). ``common_variance`` (B,) is the harmonic mean V̄
    of the models' variances and ``common_matrix`` / ``common_offset`` the linear system of scoring the
    step with V̄ for every model (:func:`ito_increment_system`), the fallback where t has no solution."""

    increment_matrix: Tensor
    increment_offset: Tensor
    row_weights: Tensor
    phi_matrix: Tensor
    phi_vector: Tensor
    common_variance: Tensor
    common_matrix: Tensor
    common_offset: Tensor

    def phi(self, kappa: Tensor) -> Tensor:
        """φ(κ) per sample (B,)."""
        k = f64(kappa)
        return (k * (self.phi_matrix @ k[:, :, None])[..., 0]).sum(-1) + (self.phi_vector * k).sum(-1)


def ito_quadratic_increment_system(
    moments: StepMoments, scale: float, coef: TransitionCoefficients, density_var: Tensor
) -> QuadraticIncrementSystem:
    """:class:`QuadraticIncrementSystem` of :func:`ito_log_density_increment` with ``density_var`` (M, B).

    Model i's increment is ``−‖uᵢ(κ)‖²/(2Vᵢ) − (d/2) log 2πVᵢ − log k(x | y(κ))`` with the residual
    ``uᵢ(κ) = c_0 (scale Σⱼ κⱼ eⱼ − eᵢ) + w``. Against the system at one common variance V̄ (the
    harmonic mean of the Vᵢ per sample, :func:`ito_increment_system`), whose c(κ) takes the common
    terms, it differs by ``−(δᵢ/2) ‖uᵢ(κ)‖² − (d/2) log(Vᵢ/V̄)`` with ``δᵢ = 1/Vᵢ − 1/V̄``, and with the
    step's :func:`step_moments` (G, h = ⟨e, w⟩, ‖w‖²)

        ‖uᵢ(κ)‖² = φ(κ) − 2 c_0² scale (Gκ)ᵢ + c_0² Gᵢᵢ − 2 c_0 hᵢ + ‖w‖²,
        φ(κ) = c_0² scale² κᵀGκ + 2 c_0 scale κ·h:

    so ``A = A(V̄) + c_0² scale diag(δ) G``, ``b = b(V̄) − (δ/2)(c_0² diag G − 2 c_0 h + ‖w‖²) − (d/2)
    log(V/V̄)`` and ``r = −δ/2``. Nothing of the sample's size is touched.
    """
    var = f64(density_var).transpose(0, 1)  # (B, M)
    inverse = var.reciprocal()  # 1/Vᵢ, formed once (as 1.0 / V would be, in one operation rather than two)
    mean_var = inverse.mean(-1).reciprocal()  # (B,) the harmonic mean V̄
    mean_inverse = mean_var.reciprocal()[:, None]  # 1/V̄ (B, 1), rounded as 1/V̄, not as the mean of the 1/Vᵢ
    gram, h, c0 = moments.gram, moments.offset_noise, coef.c_0
    # A(V̄) + c_0² scale diag(δ) G is c_0² scale G with row i scaled by 1/Vᵢ, and b(V̄) − (δ/2)(c_0² diag G − 2 c_0 h)
    # is 1/Vᵢ times the bracket c_0 h − (c_0²/2) diag G: each is formed once, then scaled per model.
    scaled_gram = (c0 * c0 * scale) * gram
    bracket = torch.add(c0 * h, torch.diagonal(gram, dim1=1, dim2=2), alpha=-0.5 * c0 * c0)
    delta = inverse - mean_inverse  # (B, M)
    b_vec = torch.addcmul(inverse * bracket, delta, moments.noise_norm2[:, None], value=-0.5)
    b_vec = torch.add(b_vec, torch.log(var * mean_inverse), alpha=-0.5 * moments.dim)
    return QuadraticIncrementSystem(inverse[..., None] * scaled_gram, b_vec, -0.5 * delta, scale * scaled_gram,
                                    (2 * c0 * scale) * h, mean_var, mean_inverse[..., None] * scaled_gram,
                                    mean_inverse * bracket)


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
    e = (
        f64(denoised.reshape(denoised.shape[0], batch, -1))
        - f64(base.reshape(batch, -1))[None]
    )
    return e.transpose(0, 1)


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
    x0 = f64(denoised.reshape(denoised.shape[0], batch, -1))
    x0_mix = f64(denoised_mix.reshape(batch, -1))
    xf = f64(x.reshape(batch, -1))
    d = xf.shape[-1]
    rate = d_alpha - d_sigma * alpha / sigma
    score = -(xf[None] - alpha * x0) / (sigma * sigma)
    div_v = d * d_sigma / sigma + rate * f64(divergence_denoised)
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
    x0 = f64(denoised.reshape(denoised.shape[0], batch, -1))
    basef = f64(base.reshape(batch, -1))
    xf = f64(x.reshape(batch, -1))
    d = xf.shape[-1]
    rate = d_alpha - d_sigma * alpha / sigma
    score = (-(xf[None] - alpha * x0) / (sigma * sigma)).transpose(0, 1)  # (B, M, d)
    e = (x0 - basef[None]).transpose(0, 1)  # (B, M, d)
    div_v = d * d_sigma / sigma + rate * f64(divergence_denoised).transpose(0, 1)
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
    estimate = (
        f64(jvp.reshape(jvp.shape[0], batch, -1)) * f64(probe.reshape(1, batch, -1))
    ).sum(-1)
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
    estimate = (f64(rows.reshape(m, batch, -1)) * f64(probe.reshape(1, batch, -1))).sum(-1)
    return value, estimate
