"""Gaussian mixtures with exact marginals under any process: ground truth for the estimator and combiners.

A mixture ``p_0 = Σ_k w_k N(μ_k, diag(s_k²))`` noised by ``x_t = α_t x_0 + σ_t ε`` stays a mixture,

    q_t = Σ_k w_k N(α_t μ_k, diag(α_t² s_k² + σ_t²)),

so its log-density, score and denoised mean ``E[x_0 | x_t]`` are exact in closed form. The denoised
mean is computed from per-component posteriors, so it stays finite where α_t = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .processes import Process

__all__ = ["GaussianMixture", "MixtureDenoiser", "product_of_mixtures", "tempered_mixture", "soft_min_log_density",
           "grid_moments"]


@dataclass(frozen=True)
class GaussianMixture:
    """A mixture of K Gaussians in d dimensions.

    ``means``: (K, d); ``stds``: (K,) isotropic or (K, d) diagonal standard deviations (may be 0
    for point masses as long as σ_t > 0 where it is evaluated); ``weights``: (K,), summing to 1.
    """

    means: Tensor
    stds: Tensor
    weights: Tensor

    @staticmethod
    def create(means, stds, weights=None) -> "GaussianMixture":
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        k, d = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 0:
            stds = stds.expand(k)
        if stds.shape not in ((k,), (k, d)):
            raise ValueError(f"stds must be a scalar, (K,) or (K, d) with K={k}, d={d}; got {tuple(stds.shape)}")
        if bool((stds < 0).any()):
            raise ValueError("stds must be non-negative")
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        given = weights if isinstance(weights, Tensor) else torch.as_tensor(weights, dtype=torch.float64)
        # a sum off by the rounding of the given precision (float32 softmax outputs) is renormalised
        tolerance = max(1e-9, 4 * k * torch.finfo(given.dtype).eps) if given.is_floating_point() else 1e-9
        weights = given.to(torch.float64)
        if weights.shape != (k,) or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) \
                or abs(float(weights.sum()) - 1.0) > tolerance:
            raise ValueError(f"weights must be {k} non-negative numbers summing to 1, got {weights.tolist()}")
        return GaussianMixture(means, stds, weights / weights.sum())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _component_variances(self) -> Tensor:
        """(K, d) data variances per component and dimension."""
        stds = self.stds if self.stds.ndim == 2 else self.stds[:, None].expand_as(self.means)
        return stds * stds

    def _noised(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        var0 = self._component_variances()
        return alpha * self.means, alpha * alpha * var0 + sigma * sigma

    def _component_log_probs(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """(B, K): ``log w_k + log N(x | α μ_k, α² s_k² + σ²)``."""
        mean, var = self._noised(alpha, sigma)
        diff = x[:, None, :] - mean[None]
        quad = (diff * diff / var[None]).sum(-1)
        log_det = torch.log(var).sum(-1)
        return torch.log(self.weights)[None] - 0.5 * (quad + log_det[None] + self.dim * math.log(2 * math.pi))

    def responsibilities(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        """(B, K): each component's posterior probability at x (B, d) under ``q_t`` (the data at the
        defaults). Their mean under the mixture is exactly its weights: an unbiased proportion to test
        samples with, where the nearest mean is biased by overlapping components."""
        x = x.to(torch.float64)
        a, s = torch.as_tensor(alpha, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
        return torch.softmax(self._component_log_probs(x, a, s), dim=-1)

    def log_prob(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """Exact ``log q_t(x)`` for x of shape (B, d); returns (B,) in float64."""
        x = x.to(torch.float64)
        a, s = torch.as_tensor(alpha, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
        return torch.logsumexp(self._component_log_probs(x, a, s), dim=-1)

    def denoised(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """Exact ``E[x_0 | x_t = x]`` (B, d), in float64."""
        x = x.to(torch.float64)
        a, s = torch.as_tensor(alpha, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
        resp = torch.softmax(self._component_log_probs(x, a, s), dim=-1)  # (B, K)
        var0 = self._component_variances()
        mean, var = self._noised(a, s)
        gain = a * var0 / var  # (K, d): Cov(x0, x_t) / Var(x_t) per component
        post = self.means[None] + gain[None] * (x[:, None, :] - mean[None])  # (B, K, d)
        return (resp[..., None] * post).sum(1)

    def score(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """Exact ``∇_x log q_t(x)`` (B, d), in float64."""
        x = x.to(torch.float64)
        a, s = torch.as_tensor(alpha, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
        resp = torch.softmax(self._component_log_probs(x, a, s), dim=-1)
        mean, var = self._noised(a, s)
        return (resp[..., None] * (mean[None] - x[:, None, :]) / var[None]).sum(1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples from the mixture at t = 0, (n, d) float64."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        stds = self._component_variances().sqrt()
        return self.means[idx] + stds[idx] * noise


@dataclass(frozen=True)
class MixtureDenoiser:
    """Exact denoisers of M Gaussian mixtures under ``process``: ``(x, t) -> (M, B, d)``.

    It follows the library's denoiser protocol (see :mod:`superdiff.models`) and is differentiable,
    so divergences (exact or Hutchinson) work through it.
    """

    mixtures: tuple[GaussianMixture, ...]
    process: Process
    #: The last mixture plays the unconditional model of classifier-free guidance.
    unconditional: bool = False

    @property
    def num_outputs(self) -> int:
        return len(self.mixtures)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.mixtures[0].dim,)

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        a, s = self.process.alpha(t), self.process.sigma(t)
        return torch.stack([m.denoised(x, a, s).to(x.dtype) for m in self.mixtures])

    def log_prob(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Exact log-densities (B, M) of every mixture at time t."""
        a, s = self.process.alpha(t), self.process.sigma(t)
        return torch.stack([m.log_prob(x, a, s) for m in self.mixtures], dim=-1)


def _gaussian_product(mixture_a: GaussianMixture, mixture_b: GaussianMixture) -> GaussianMixture:
    """The normalised product of two mixtures: every pair of components multiplies into one Gaussian,
    ``N(μ_a, V_a) N(μ_b, V_b) = N(μ_a; μ_b, V_a + V_b) · N(m, V)`` with ``V = (V_a⁻¹ + V_b⁻¹)⁻¹``,
    ``m = V (V_a⁻¹ μ_a + V_b⁻¹ μ_b)`` (diagonal covariances)."""
    va, vb = mixture_a._component_variances(), mixture_b._component_variances()  # (Ka, d), (Kb, d)
    ma, mb = mixture_a.means, mixture_b.means
    vsum = va[:, None] + vb[None]  # (Ka, Kb, d)
    var = va[:, None] * vb[None] / vsum
    mean = var * (ma[:, None] / va[:, None] + mb[None] / vb[None])
    diff = ma[:, None] - mb[None]
    log_overlap = -0.5 * ((diff * diff / vsum).sum(-1) + torch.log(vsum).sum(-1)
                          + mixture_a.dim * math.log(2 * math.pi))
    log_w = torch.log(mixture_a.weights)[:, None] + torch.log(mixture_b.weights)[None] + log_overlap
    d = mixture_a.dim
    return GaussianMixture.create(mean.reshape(-1, d), var.sqrt().reshape(-1, d), torch.softmax(log_w.reshape(-1), 0))


def product_of_mixtures(mixtures: tuple[GaussianMixture, ...], exponents: tuple[int, ...]) -> GaussianMixture:
    """The exact normalised product ``Π qᵢ^βᵢ / Z`` of Gaussian mixtures at t = 0, for positive
    integer exponents (a mixture raised to an integer power is the product of its copies): the
    reference the Feynman–Kac-corrected products of :mod:`superdiff.expressions` are tested against."""
    if len(mixtures) != len(exponents) or not mixtures:
        raise ValueError("pass one exponent per mixture")
    factors = []
    for m, b in zip(mixtures, exponents):
        if isinstance(b, bool) or int(b) != b or b < 1:
            raise ValueError(f"exponents must be positive integers here, got {b}; see tempered_mixture for others")
        factors += [m] * int(b)
    out = factors[0]
    for f in factors[1:]:
        out = _gaussian_product(out, f)
    return out


def tempered_mixture(mixture: GaussianMixture, beta: float) -> GaussianMixture:
    """``q^β / Z`` for a mixture whose components are far apart (their overlaps negligible), where
    ``(Σ w_k N_k)^β ≈ Σ w_k^β N_k^β`` and ``N(μ, V)^β ∝ N(μ, V/β)`` with mass ``∫N^β = (2π)^{d(1−β)/2}
    |V|^{(1−β)/2} β^{−d/2}``. Exact for one component; the error is of the order of the overlaps."""
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    var = mixture._component_variances()
    d = mixture.dim
    log_mass = 0.5 * d * (1 - beta) * math.log(2 * math.pi) + 0.5 * (1 - beta) * torch.log(var).sum(-1) \
        - 0.5 * d * math.log(beta)
    log_w = beta * torch.log(mixture.weights) + log_mass
    return GaussianMixture.create(mixture.means, (var / beta).sqrt(), torch.softmax(log_w, 0))


def soft_min_log_density(mixtures: tuple[GaussianMixture, ...], sharpness: float, x: Tensor) -> Tensor:
    """The unnormalised log-density of the soft-min ``−(1/λ) log Σᵢ qᵢ(x)^{−λ}`` of mixtures at t = 0
    (the target of :class:`superdiff.expressions.SoftMin`), exact at points x (B, d); returns (B,)."""
    if not (math.isfinite(sharpness) and sharpness > 0):
        raise ValueError(f"sharpness must be a finite number > 0, got {sharpness}")
    logs = torch.stack([m.log_prob(x, 1.0, 0.0) for m in mixtures], -1)
    return -torch.logsumexp(-sharpness * logs, -1) / sharpness


def grid_moments(log_density, low: float, high: float, points: int, dim: int = 2) -> tuple[Tensor, Tensor]:
    """Mean (d,) and second moments E[xₖ²] (d,) of the normalised density ``exp(log_density(x))`` by
    the midpoint rule on the cube [low, high]^d with ``points`` per axis (for d ≤ 2: a reference for
    targets with no closed form). ``log_density`` maps (B, d) float64 to (B,)."""
    h = (high - low) / points
    axis = low + h * (torch.arange(points, dtype=torch.float64) + 0.5)
    grid = torch.stack(torch.meshgrid(*([axis] * dim), indexing="ij"), -1).reshape(-1, dim)
    w = torch.softmax(log_density(grid), 0)
    return (w[:, None] * grid).sum(0), (w[:, None] * grid * grid).sum(0)
