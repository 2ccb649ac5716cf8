"""Gaussian noising processes ``x_t = α_t x_0 + σ_t ε`` and conversions between model outputs.

Time runs from ``t = 0`` (data) to ``t = 1`` (noise), as in the paper (§1, Eq. 3). Every process
gives ``α_t``, ``σ_t`` and their time derivatives; the forward SDE follows (Eq. 4):

    f_t(x) = (∂_t log α_t) x,      g_t² = 2 σ_t² ∂_t log(σ_t / α_t).

The library's internal currency is the *denoised* prediction ``x̂_0 = E[x_0 | x_t]`` (as in
k-diffusion's denoiser). Every other parameterisation converts to it here, at the boundary, and it
stays finite at both ends of every supported process (σ → 0, and α = 0 for flow matching, where
ε- or score-based forms divide by zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Prediction",
    "PREDICTIONS",
    "Process",
    "VPLinear",
    "VPLinearSigmaT",
    "VPCosine",
    "VarianceExploding",
    "EDM",
    "RectifiedFlow",
    "DiscreteVP",
    "DiscreteSigma",
    "to_denoised",
    "from_denoised",
]

Prediction = Literal["epsilon", "sample", "v_prediction", "flow", "score", "scaled_score"]
PREDICTIONS: tuple[str, ...] = ("epsilon", "sample", "v_prediction", "flow", "score", "scaled_score")


def _as_time(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class Process:
    """A Gaussian noising process. Subclasses define ``alpha``/``sigma`` and their derivatives.

    All methods take a time ``t`` (float or float64 tensor, any shape) and return float64 tensors.
    """

    #: Largest time at which the process is defined (α may vanish there, as for flows).
    t_max: float = 1.0
    #: Smallest time at which σ_t > 0 can be relied upon for sampling.
    t_min: float = 1e-3

    def alpha(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def drift_coefficient(self, t: Tensor | float) -> Tensor:
        """``∂_t log α_t``: the forward drift is ``f_t(x) = drift_coefficient(t) · x`` (Eq. 4)."""
        return self.d_alpha(t) / self.alpha(t)

    def diffusion_squared(self, t: Tensor | float) -> Tensor:
        """``g_t² = 2 σ_t² ∂_t log(σ_t/α_t) = 2 σ σ̇ − 2 σ² α̇/α`` (Eq. 4)."""
        a, s = self.alpha(t), self.sigma(t)
        return 2.0 * s * self.d_sigma(t) - 2.0 * s * s * self.d_alpha(t) / a

    def prior_std(self) -> float:
        """Standard deviation of the reference ``N(0, σ_1² I)`` that sampling starts from."""
        return float(self.sigma(self.t_max))

    def time_grid(self, steps: int, t_start: float | None = None, t_end: float | None = None) -> Tensor:
        """``steps + 1`` decreasing times from ``t_start`` (default ``t_max``) to ``t_end`` (``t_min``)."""
        start = self.t_max if t_start is None else t_start
        end = self.t_min if t_end is None else t_end
        return torch.linspace(start, end, steps + 1, dtype=torch.float64)


@dataclass(frozen=True)
class VPLinear(Process):
    """Variance-preserving process with linear β(t) (DDPM / score-SDE VP; the paper's β 0.1 → 20).

    ``log α_t = −¼ t² (β₁ − β₀) − ½ t β₀`` and ``σ_t = sqrt(1 − α_t²)``. The authors' CIFAR-10 and
    toy code pair this α with σ_t = t instead: :class:`VPLinearSigmaT`.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3

    def _log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.exp(self._log_alpha(_as_time(t)))

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self._log_alpha(_as_time(t))))

    def d_alpha(self, t: Tensor | float) -> Tensor:
        t = _as_time(t)
        return self.alpha(t) * (-0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min)

    def d_sigma(self, t: Tensor | float) -> Tensor:
        t = _as_time(t)
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)


@dataclass(frozen=True)
class VPLinearSigmaT(VPLinear):
    """:class:`VPLinear`'s α_t with ``σ_t = t``: not variance preserving, but the schedule the
    authors' CIFAR-10 and toy code ran (their JAX code sets σ_t = t, the VP choice commented out), so their models'
    times mean the same here. ``g_t² = 2 t (1 + ½ t β₀ + ½ t² (β₁ − β₀))``.
    """

    def sigma(self, t: Tensor | float) -> Tensor:
        return _as_time(t).clone()

    def d_sigma(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(_as_time(t))


@dataclass(frozen=True)
class VPCosine(Process):
    """Variance-preserving cosine schedule (Nichol & Dhariwal): ``α_t = cos(π/2 (t+s)/(1+s)) / cos(π/2 s/(1+s))``.

    α reaches 0 at t = 1, so sampling starts at ``t_max`` slightly below 1 by default.
    """

    s: float = 0.008
    t_max: float = 0.999
    t_min: float = 1e-3

    def _phase(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * (t + self.s) / (1.0 + self.s)

    def alpha(self, t: Tensor | float) -> Tensor:
        t = _as_time(t)
        return torch.cos(self._phase(t)) / math.cos(0.5 * math.pi * self.s / (1.0 + self.s))

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.sqrt((1.0 - self.alpha(t) ** 2).clamp_min(0.0))

    def d_alpha(self, t: Tensor | float) -> Tensor:
        t = _as_time(t)
        scale = 0.5 * math.pi / (1.0 + self.s)
        return -scale * torch.sin(self._phase(t)) / math.cos(0.5 * math.pi * self.s / (1.0 + self.s))

    def d_sigma(self, t: Tensor | float) -> Tensor:
        t = _as_time(t)
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)


class _UnitAlpha(Process):
    """A σ-only process, ``α_t = 1`` (variance exploding, EDM): subclasses define σ and its derivative."""

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(_as_time(t))

    def d_alpha(self, t: Tensor | float) -> Tensor:
        return torch.zeros_like(_as_time(t))


@dataclass(frozen=True)
class VarianceExploding(_UnitAlpha):
    """Variance-exploding process (Song et al.): ``α_t = 1``, ``σ_t = σ_min (σ_max/σ_min)^t``."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 0.0

    def sigma(self, t: Tensor | float) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _as_time(t)

    def d_sigma(self, t: Tensor | float) -> Tensor:
        return self.sigma(t) * math.log(self.sigma_max / self.sigma_min)

    def prior_std(self) -> float:
        return self.sigma_max


@dataclass(frozen=True)
class EDM(_UnitAlpha):
    """The EDM (Karras et al.) σ schedule as a process: ``α = 1``,
    ``σ_t = (σ_min^{1/ρ} + t (σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ``, so ``t = 1`` is σ_max."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    t_min: float = 0.0

    def _base(self, t: Tensor) -> Tensor:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return lo + t * (hi - lo)

    def sigma(self, t: Tensor | float) -> Tensor:
        return self._base(_as_time(t)) ** self.rho

    def d_sigma(self, t: Tensor | float) -> Tensor:
        t = _as_time(t)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return self.rho * self._base(t) ** (self.rho - 1) * (hi - lo)


@dataclass(frozen=True)
class RectifiedFlow(Process):
    """Rectified flow / flow matching: ``α_t = 1 − t``, ``σ_t = t``. α = 0 at t = 1 (pure noise)."""

    t_min: float = 1e-3

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1.0 - _as_time(t)

    def sigma(self, t: Tensor | float) -> Tensor:
        return _as_time(t).clone()

    def d_alpha(self, t: Tensor | float) -> Tensor:
        return -torch.ones_like(_as_time(t))

    def d_sigma(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(_as_time(t))


class _Tabulated(Process):
    """Shared machinery of processes given by a table over equally spaced times ``t_k = k/(N−1)``.

    ``log α`` and ``log σ`` are interpolated linearly in t, so the derivatives are piecewise constant.
    """

    def __init__(self, log_alpha_table: Tensor, log_sigma_table: Tensor) -> None:
        self.log_alpha_table = log_alpha_table
        self.log_sigma_table = log_sigma_table

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_train_timesteps={self.log_alpha_table.numel()})"

    def _interp(self, table: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        n = table.numel() - 1
        pos = (t.clamp(0.0, 1.0) * n)
        k = pos.floor().clamp(max=n - 1).long()
        frac = pos - k
        lo, hi = table[k], table[k + 1]
        return lo + frac * (hi - lo), (hi - lo) * n

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.exp(self._interp(self.log_alpha_table, _as_time(t))[0])

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.exp(self._interp(self.log_sigma_table, _as_time(t))[0])

    def d_alpha(self, t: Tensor | float) -> Tensor:
        value, slope = self._interp(self.log_alpha_table, _as_time(t))
        return torch.exp(value) * slope

    def d_sigma(self, t: Tensor | float) -> Tensor:
        value, slope = self._interp(self.log_sigma_table, _as_time(t))
        return torch.exp(value) * slope

    def timestep(self, t: Tensor | float) -> Tensor:
        """The network's (diffusers) timestep for time ``t``: ``t · (N − 1)``."""
        return _as_time(t) * (self.log_alpha_table.numel() - 1)

    def time_of_timestep(self, timestep: Tensor | float) -> Tensor:
        return _as_time(timestep) / (self.log_alpha_table.numel() - 1)

    def __eq__(self, other: object) -> bool:
        return (
            type(self) is type(other)
            and torch.equal(self.log_alpha_table, other.log_alpha_table)  # type: ignore[attr-defined]
            and torch.equal(self.log_sigma_table, other.log_sigma_table)  # type: ignore[attr-defined]
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.log_alpha_table.numel()))


def _alphas_cumprod_of(scheduler_or_table: object) -> Tensor:
    table = getattr(scheduler_or_table, "alphas_cumprod", scheduler_or_table)
    table = torch.as_tensor(table, dtype=torch.float64)
    if table.ndim != 1 or table.numel() < 2:
        raise ValueError(
            f"alphas_cumprod must be a 1-D table of at least 2 values, got shape {tuple(table.shape)}; "
            "pass a diffusers DDPM/DDIM/Euler scheduler or its `alphas_cumprod`."
        )
    return table


class DiscreteVP(_Tabulated):
    """A discrete DDPM schedule (``ᾱ_k`` from a diffusers scheduler) as a VP process:
    ``α = sqrt(ᾱ)``, ``σ = sqrt(1 − ᾱ)``, timestep ``k`` at ``t = k/(N−1)``."""

    t_min = 0.0

    def __init__(self, alphas_cumprod: Tensor) -> None:
        abar = _alphas_cumprod_of(alphas_cumprod)
        super().__init__(0.5 * torch.log(abar), 0.5 * torch.log1p(-abar))

    @classmethod
    def from_scheduler(cls, scheduler: object) -> "DiscreteVP":
        return cls(_alphas_cumprod_of(scheduler))


class DiscreteSigma(_Tabulated):
    """The σ-parameterised ("Karras"/Euler) form of a discrete DDPM schedule, as Stable Diffusion's
    ``EulerDiscreteScheduler`` uses it: ``x = x_VP / α_VP``, so ``α = 1`` and ``σ = sqrt((1 − ᾱ)/ᾱ)``.
    A network trained on VP inputs sees ``x / sqrt(σ² + 1)``."""

    t_min = 0.0

    def __init__(self, alphas_cumprod: Tensor) -> None:
        abar = _alphas_cumprod_of(alphas_cumprod)
        super().__init__(torch.zeros_like(abar), 0.5 * (torch.log1p(-abar) - torch.log(abar)))

    @classmethod
    def from_scheduler(cls, scheduler: object) -> "DiscreteSigma":
        return cls(_alphas_cumprod_of(scheduler))

    def prior_std(self) -> float:
        # Like diffusers' `init_noise_sigma` for a "leading"/"trailing" spacing.
        return float(math.sqrt(float(self.sigma(self.t_max)) ** 2 + 1.0))


# --------------------------------------------------------------------------------------------
# Conversions between model outputs and the denoised prediction x̂₀.
# x = α x₀ + σ ε;  score = ∇log q = −ε/σ;  diffusers' v = α ε − σ x₀;  flow velocity u = α̇ x₀ + σ̇ ε.
# --------------------------------------------------------------------------------------------


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def to_denoised(
    output: Tensor,
    prediction: str,
    x: Tensor,
    alpha: Tensor | float,
    sigma: Tensor | float,
    d_alpha: Tensor | float | None = None,
    d_sigma: Tensor | float | None = None,
) -> Tensor:
    """Convert a network ``output`` of type ``prediction`` at state ``x`` into ``x̂₀``.

    ``alpha``/``sigma`` (and ``d_alpha``/``d_sigma`` for ``"flow"``) are scalars or tensors that
    broadcast against ``x``.
    """
    _check_prediction(prediction)
    if prediction == "sample":
        return output
    if prediction == "epsilon":
        return (x - sigma * output) / alpha
    if prediction == "score":
        return (x + sigma * sigma * output) / alpha
    if prediction == "scaled_score":
        return (x + sigma * output) / alpha
    if prediction == "v_prediction":
        return (alpha * x - sigma * output) / (alpha * alpha + sigma * sigma)
    if d_alpha is None or d_sigma is None:
        raise ValueError("prediction='flow' needs d_alpha and d_sigma (the process's time derivatives)")
    return (d_sigma * x - sigma * output) / (d_sigma * alpha - sigma * d_alpha)


def from_denoised(
    denoised: Tensor,
    prediction: str,
    x: Tensor,
    alpha: Tensor | float,
    sigma: Tensor | float,
    d_alpha: Tensor | float | None = None,
    d_sigma: Tensor | float | None = None,
) -> Tensor:
    """Inverse of :func:`to_denoised`: the output of type ``prediction`` that gives ``denoised``."""
    _check_prediction(prediction)
    if prediction == "sample":
        return denoised
    eps = (x - alpha * denoised) / sigma
    if prediction == "epsilon":
        return eps
    if prediction == "score":
        return -eps / sigma
    if prediction == "scaled_score":
        return -eps
    if prediction == "v_prediction":
        return alpha * eps - sigma * denoised
    if d_alpha is None or d_sigma is None:
        raise ValueError("prediction='flow' needs d_alpha and d_sigma (the process's time derivatives)")
    return d_alpha * denoised + d_sigma * eps
