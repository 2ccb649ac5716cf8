"""Time grids for a process: where the sampler's steps fall between noise and data.

Each function returns ``steps + 1`` decreasing float64 times from ``t_start`` (default the
process's ``t_max``) to ``t_end`` (default its ``t_min``), the same ends as
:meth:`superdiff.processes.Process.time_grid`, so any of them can be passed as ``times`` to
:func:`superdiff.sampling.sample_sde` or :func:`~superdiff.sampling.sample_ode`. Every time has
σ > 0, so the densities are tracked to the last one; with ``final_denoise=True`` the sampler's
last step lands on σ = 0 instead (as diffusers' schedulers and EDM's sampler end).

Grids other than the uniform one are placed by a quantity of the process, the log signal-to-noise
ratio ``λ(t) = log(α_t²/σ_t²)`` (equivalently the σ/α ratio ``r = e^{−λ/2}``, the σ of EDM's
α = 1 form), and mapped back to times by bisection in float64: the processes give α and σ but no
inverse, and λ decreases strictly in t on every process the samplers accept.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .processes import Process

__all__ = [
    "GRIDS",
    "uniform_time_grid",
    "quadratic_time_grid",
    "log_snr_time_grid",
    "edm_time_grid",
    "log_snr",
    "time_of_log_snr",
]

#: Bisection halvings: 2⁻¹⁰⁰ of the bracket is below float64's resolution of any t in [0, 1].
_BISECTIONS = 100


def log_snr(process: Process, t: Tensor | float) -> Tensor:
    """``λ(t) = log(α_t²/σ_t²)`` in float64 (−inf where α = 0, +inf where σ = 0)."""
    return 2.0 * (torch.log(process.alpha(t)) - torch.log(process.sigma(t)))


def time_of_log_snr(process: Process, lam: Tensor, t_lo: float, t_hi: float) -> Tensor:
    """The times in ``[t_lo, t_hi]`` where the process's log-SNR equals ``lam``, by bisection.

    Vectorised over ``lam`` (any shape, float64); λ must decrease in t on the bracket. Values outside
    ``[λ(t_hi), λ(t_lo)]`` end at the nearer end of the bracket.
    """
    lam = torch.as_tensor(lam, dtype=torch.float64)
    lo = torch.full_like(lam, t_lo)
    hi = torch.full_like(lam, t_hi)
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        noisier = log_snr(process, mid) < lam  # λ falls with t: the root lies below mid
        hi = torch.where(noisier, mid, hi)
        lo = torch.where(noisier, lo, mid)
    return 0.5 * (lo + hi)


def _ends(process: Process, steps: int, t_start: float | None, t_end: float | None) -> tuple[int, float, float]:
    """Check a grid's arguments once; return its first and last times."""
    if not isinstance(process, Process):
        hint = " (a denoiser's is its .process)" if hasattr(process, "process") else ""
        raise ValueError(f"process must be a superdiff Process{hint}, got {type(process).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    start = float(process.t_max if t_start is None else t_start)
    end = float(process.t_min if t_end is None else t_end)
    if not (0.0 <= end < start <= process.t_max):
        raise ValueError(
            f"a grid runs from t_start down to t_end with 0 <= t_end < t_start <= t_max = {process.t_max}; "
            f"got t_start={start}, t_end={end}"
        )
    if not (float(process.sigma(end)) > 0):
        raise ValueError(f"the grid's last time needs σ > 0 (densities are tracked there); t_end={end} has σ = 0")
    return int(steps), start, end


def _finite_log_snr_ends(process: Process, start: float, end: float, grid: str) -> tuple[float, float]:
    lam_start, lam_end = float(log_snr(process, start)), float(log_snr(process, end))
    if not (math.isfinite(lam_start) and math.isfinite(lam_end)):
        raise ValueError(
            f"the {grid} grid needs α > 0 and σ > 0 at both ends; {type(process).__name__} has log-SNR {lam_start} "
            f"at t_start={start} and {lam_end} at t_end={end} (a flow's α vanishes at t = 1: pass t_start < 1)"
        )
    if not (lam_start < lam_end):
        raise ValueError(f"the process must be noisier at t_start={start} than at t_end={end} (σ/α larger)")
    return lam_start, lam_end


def _from_log_snr(process: Process, lam: Tensor, start: float, end: float) -> Tensor:
    """Times of the log-SNRs ``lam`` (steps+1, increasing), the ends set exactly."""
    times = time_of_log_snr(process, lam, end, start)
    times[0], times[-1] = start, end
    return times


def uniform_time_grid(
    process: Process, steps: int, *, t_start: float | None = None, t_end: float | None = None
) -> Tensor:
    """Equal steps in t: ``t_i = t_start + (i/N)(t_end − t_start)``, i = 0…N (N = ``steps``).

    What :meth:`~superdiff.processes.Process.time_grid` gives, and the samplers' default. On a
    discrete DDPM schedule it is diffusers' "linspace" spacing; on VE it is uniform in log σ (and so
    in λ); on :class:`~superdiff.processes.EDM` it is EDM's ρ-grid.

    Returns:
        (steps + 1,) float64, decreasing.
    """
    steps, start, end = _ends(process, steps, t_start, t_end)
    times = torch.linspace(start, end, steps + 1, dtype=torch.float64)
    times[0], times[-1] = start, end
    return times


def quadratic_time_grid(
    process: Process, steps: int, *, t_start: float | None = None, t_end: float | None = None
) -> Tensor:
    """DDIM's quadratic spacing (Song et al. 2021, App. D.2: τ_i = ⌊c i²⌋ for CIFAR-10), continuous:
    ``t_i = t_end + (t_start − t_end)(1 − i/N)²``, i = 0…N, so steps shrink linearly towards the data.

    Returns:
        (steps + 1,) float64, decreasing.
    """
    steps, start, end = _ends(process, steps, t_start, t_end)
    u = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    times = end + (start - end) * u * u
    times[0], times[-1] = start, end
    return times


def log_snr_time_grid(
    process: Process, steps: int, *, t_start: float | None = None, t_end: float | None = None
) -> Tensor:
    """Equal steps in log-SNR (DPM-Solver's "logSNR" spacing, Lu et al. 2022):
    ``λ_i = λ(t_start) + (i/N)(λ(t_end) − λ(t_start))``, ``t_i = λ⁻¹(λ_i)`` by bisection.

    On VE (log σ linear in t) it is the uniform grid. EDM's grid tends to it as ρ → ∞.

    Returns:
        (steps + 1,) float64, decreasing.
    """
    steps, start, end = _ends(process, steps, t_start, t_end)
    lam_start, lam_end = _finite_log_snr_ends(process, start, end, "log-SNR")
    lam = torch.linspace(lam_start, lam_end, steps + 1, dtype=torch.float64)
    return _from_log_snr(process, lam, start, end)


def edm_time_grid(
    process: Process,
    steps: int,
    rho: float = 7.0,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
) -> Tensor:
    """EDM's σ-grid (Karras et al. 2022, Eq. 5) on the σ/α ratio of any process:

        r_i = (r_max^{1/ρ} + i/(N−1) (r_min^{1/ρ} − r_max^{1/ρ}))^ρ,   i = 0 … N−1,

    with N = ``steps + 1`` points, ``r = σ_t/α_t`` (EDM's σ of the α = 1 form), r_max and r_min its
    values at ``t_start`` and ``t_end``; ``t_i`` is where σ/α = r_i (by bisection on λ = −2 log r).
    EDM appends σ_N = 0 to its grid; here the sampler's ``final_denoise=True`` does that. ρ = 7 is
    EDM's choice; ρ = 1 is uniform in σ/α, and ρ → ∞ the log-SNR grid. On
    :class:`~superdiff.processes.EDM` with its own σ_min, σ_max and ρ it is the uniform grid.

    Returns:
        (steps + 1,) float64, decreasing.
    """
    steps, start, end = _ends(process, steps, t_start, t_end)
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a finite number > 0 (EDM uses 7), got {rho!r}")
    lam_start, lam_end = _finite_log_snr_ends(process, start, end, "EDM")
    inv_rho = 1.0 / rho
    # r^{1/ρ} = e^{−λ/(2ρ)}, formed from λ so that r itself (up to 1e4 and more) is never raised to 1/ρ.
    r_max_root, r_min_root = math.exp(-0.5 * lam_start * inv_rho), math.exp(-0.5 * lam_end * inv_rho)
    i = torch.arange(steps + 1, dtype=torch.float64)
    root = r_max_root + i / steps * (r_min_root - r_max_root)  # Eq. 5 inside the power, N − 1 = steps
    lam = -2.0 * rho * torch.log(root)  # λ = −2 log r, r = root^ρ
    return _from_log_snr(process, lam, start, end)


#: The grids by name, for benchmarks and command lines: ``GRIDS[name](process, steps)``.
GRIDS = {
    "uniform": uniform_time_grid,
    "quadratic": quadratic_time_grid,
    "log_snr": log_snr_time_grid,
    "edm": edm_time_grid,
}
