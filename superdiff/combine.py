"""Superposition weights κ: the math of OR (mixture) and AND (equal densities), and the flat combiners.

The combiners themselves are expression nodes (:mod:`superdiff.expressions`): ``And()`` and ``Or()``
without children compose all the models, ``Fixed``/``Average``/``Sum`` build an uncorrected product,
and :func:`make_combiner` turns a mode name into one of them.

A combiner sees only numbers: the tracked log-densities ``log q_i`` of the current samples and,
for AND, the linear dependence of this step's log-density increments on κ,

    Δ log q_i(κ) = Σ_j A_ij κ_j + b_i + c(κ)          (Eq. 77; c is common to every model),

which the sampler derives from the same estimator it uses to track the densities. It returns
per-sample weights κ (B, M). It knows nothing of networks, prompts or processes, so combiners can
be reused for separately trained models, prompts of one network, or exact mixtures.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

import torch
from torch import Tensor

from ._numeric import f64
from .limits import gain_problem, scale_problem

if TYPE_CHECKING:
    from .expressions import And, Or, Product  # noqa: F401 - And and Or are served by __getattr__

__all__ = [
    "CombineInputs",
    "Combiner",
    "Or",
    "And",
    "Average",
    "Sum",
    "Fixed",
    "or_weights",
    "and_weights",
    "and_feedback_offsets",
    "make_combiner",
    "check_combiner",
    "MODES",
]

MODES = ("and", "or", "average", "sum")


@dataclass(frozen=True)
class CombineInputs:
    """What a combiner may look at during one step.

    ``log_q``: (B, M) tracked log-densities at the pre-step point.
    ``increment_matrix`` (B, M, M) and ``increment_offset`` (B, M): the linear system above, in
    nats for this step; None when the sampler was told the combiner does not need it. On a last
    step onto σ = 0, where no increment is finite, its limit up to a positive factor
    (:func:`superdiff.density.ito_final_step_system`), with ``step_fraction`` 0.
    ``step_fraction``: this step's share of the tracked trajectory (1/N for N equal steps).
    ``score_gram`` (B, M, M): the models' score inner products ``⟨sᵢ, sⱼ⟩`` at the pre-step point,
    and ``g2_dt`` the step's ``g² dτ``, for a combiner that declares ``needs_scores`` (the
    Feynman–Kac corrections of :mod:`superdiff.expressions`); None / 0 otherwise.
    """

    log_q: Tensor
    increment_matrix: Tensor | None = None
    increment_offset: Tensor | None = None
    step_fraction: float = 1.0
    score_gram: Tensor | None = None
    g2_dt: float = 0.0


class Combiner(Protocol):
    #: True if the combiner needs ``increment_matrix``/``increment_offset``.
    needs_system: bool
    #: True if the weights always sum to 1 (a mixture of models, not a product).
    affine: bool
    # Optional: ``affine_in_offset = True`` declares κ affine in ``increment_offset``, so that under one
    # estimator variance per model the sampler reads κ off two solves rather than solving again to check it
    # (:attr:`superdiff.expressions.CompiledExpression.affine_in_offset`); ``solves_offset_columns = True``
    # declares that it takes offsets (B, M, k) and answers κ (B, M, k) linear along them (NaN where it cannot),
    # so the sampler solves b and b + r in one call (:attr:`~superdiff.expressions.CompiledExpression.
    # solves_offset_columns`); without either the sampler checks.

    def __call__(self, inputs: CombineInputs) -> Tensor: ...


def _device_constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A constant vector on ``device``, copied there once per (values, dtype, device), not every step."""
    return _cached_constant(values, dtype, device, torch.is_inference_mode_enabled())


@functools.lru_cache(maxsize=64)
def _cached_constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device, inference: bool) -> Tensor:
    # ``inference`` keys the cache only: a tensor made under inference_mode cannot enter autograd.
    return torch.tensor(values, dtype=dtype, device=device)


def _refuse(argument: str, given: object, works: str) -> None:
    raise ValueError(f"{argument}={given!r} is not valid; {works}")


def _check_finite(name: str, values: Sequence[float] | None) -> None:
    if values is not None and not all(math.isfinite(float(v)) for v in values):
        _refuse(name, tuple(values), "every entry must be a finite number")


def _number_tuple(name: str, values: Sequence[float] | Tensor | None) -> tuple[float, ...] | None:
    """``values`` as a tuple of floats (None stays None); ``ValueError`` naming ``name`` for anything
    that is not a sequence of finite numbers."""
    if values is None:
        return None
    try:
        if isinstance(values, (str, bytes)):
            raise TypeError
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        _refuse(name, values, "pass a sequence of numbers, one per model, e.g. (0.0, 1.5)")
    _check_finite(name, numbers)
    return numbers


def _check_temperature(temperature: object) -> None:
    """The one check of OR's temperature T: a finite number > 0, in :func:`superdiff.limits.scale_problem`'s range."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        _refuse("temperature", temperature, "use a finite number > 0 (1.0 samples the exact mixture for mode='or')")
    _in_range([scale_problem("temperature", temperature)])


def _in_range(problems: Sequence[str | None]) -> None:
    """Raise the first range problem of :mod:`superdiff.limits`, if any."""
    for problem in problems:
        if problem:
            raise ValueError(problem)


def _check_count(name: str, values: tuple[float, ...] | None, num_models: int, what: str) -> None:
    """One entry of ``values`` per model (``what`` names the models: "prompts", "unets", "models")."""
    if values is not None and len(values) != num_models:
        _refuse(name, values, f"pass {num_models} numbers, one for each of the {num_models} {what}")


def _check_at_least_two(mode: str, num_models: int, what: str) -> None:
    """OR and AND compare models: the one check that they have two or more."""
    if num_models < 2:
        raise ValueError(
            f"{what}=<{num_models} given> is not valid; mode={mode!r} composes at least 2 {what}; pass 2 or more, "
            "or use mode='average'"
        )


def _log_weights_tensor(log_weights: Sequence[float] | Tensor | None, m: int, like: Tensor) -> Tensor:
    if log_weights is None:
        return like.new_zeros(m)
    if isinstance(log_weights, Tensor):
        lw = log_weights.to(dtype=like.dtype, device=like.device)
    else:
        lw = _device_constant(tuple(float(v) for v in log_weights), like.dtype, like.device)
    if lw.shape != (m,):
        raise ValueError(f"log_weights must have one entry per model ({m}), got shape {tuple(lw.shape)}")
    return lw


def or_weights(log_q: Tensor, temperature: float = 1.0, log_weights: Tensor | None = None) -> Tensor:
    """OR (Algorithm 1): ``κ = softmax(T · log q + ℓ)`` over models, per sample.

    T = 1 and ℓ = log ω samples the mixture ``Σ ω_i q_i`` (Prop. 4). Non-finite log-densities are
    clamped, so an overflowing or −inf entry never produces NaN.

    Args:
        log_q: (B, M) tracked log-densities.
        temperature: T > 0.
        log_weights: (M,) ℓ, or None.

    Returns:
        (B, M) weights summing to 1 per sample.
    """
    logits = temperature * log_q
    if log_weights is not None:
        logits = logits + log_weights
    finfo = torch.finfo(logits.dtype)
    logits = torch.nan_to_num(logits, nan=finfo.min, posinf=finfo.max, neginf=finfo.min)
    return torch.softmax(logits, dim=-1)


def and_weights(
    increment_matrix: Tensor,
    increment_offset: Tensor,
    target_offsets: Tensor | None = None,
    rtol: float = 1e-8,
) -> Tensor:
    """AND (Prop. 6, Eq. 78): κ with ``Σκ = 1`` making ``Δ log q_i − target_offsets_i`` equal for all i.

    Solves ``[A −1; 1ᵀ 0] [κ; λ] = [target − b; 1]`` per sample in float64: for M = 2 in closed
    form, for M > 2 as the reduced (M−1)×(M−1) system of :func:`_and_weights_reduced`. Singular
    systems (for example two identical models) get the minimum-norm solution, which splits the
    weight evenly between indistinguishable models. ``rtol`` says what counts as singular: for M = 2
    a slope at or below ``rtol·max|A|``, for M > 2 the damping ``rtol·‖K‖²_F`` of
    :func:`_min_norm_solve`. Nothing here waits for the device. κ is not constrained to [0, 1].

    Several offsets for one matrix, ``increment_offset`` (B, M, k), are solved as k columns of one
    system: for M > 2 each sample takes one kind of solution, exact or damped, for all its columns, so
    κ is linear in the offset along them (a combination of columns solves the combined offset); a
    sample whose columns would take different kinds gets NaN in every column.

    Args:
        increment_matrix: (B, M, M) A, this step's increments' dependence on κ (Eq. 77).
        increment_offset: (B, M) b, or (B, M, k) k offsets.
        target_offsets: (B, M) prescribed differences (Eq. 18), or None for equal increments.
        rtol: what counts as singular, in (0, 1).

    Returns:
        (B, M) float64 κ summing to 1 per sample, or (B, M, k) one κ per offset.
    """
    a = f64(increment_matrix)
    b = f64(increment_offset)
    m = a.shape[-1]
    if b.dim() == 3 and m == 2:  # the closed form is linear in b as it stands: column by column
        return torch.stack([and_weights(a, b[..., j], target_offsets, rtol) for j in range(b.shape[-1])], -1)
    if b.dim() == 3 and target_offsets is not None:
        target_offsets = target_offsets[..., None]
    # Each sample's equations may be rescaled freely (λ absorbs it): the slope for M = 2 is compared
    # with the largest entry of A, and for M > 2 A is brought to unit size before the solve.
    scale = a.abs().amax(dim=(-2, -1))
    if m == 2 and target_offsets is None:  # rhs = −b: its rows' difference is b₂ − b₁ (the same bits)
        return _and_weights_two(a, b[:, 1] - b[:, 0], rtol * scale)
    rhs_top = -b if target_offsets is None else f64(target_offsets) - b
    if m == 2:
        return _and_weights_two(a, rhs_top[:, 0] - rhs_top[:, 1], rtol * scale)
    a, rhs_top, scale = torch.nan_to_num(a), torch.nan_to_num(rhs_top), torch.nan_to_num(scale)
    scale = scale.clamp_min(torch.finfo(torch.float64).tiny)
    if rhs_top.dim() == 3:
        return _and_weights_reduced(a / scale[:, None, None], rhs_top / scale[:, None, None], rtol)
    return _and_weights_reduced(a / scale[:, None, None], rhs_top[..., None] / scale[:, None, None], rtol)[..., 0]


def _and_weights_reduced(a: Tensor, rhs: Tensor, rtol: float) -> Tensor:
    """κ (B, M, k) for M > 2 from the reduced (M−1)×(M−1) system, solved exactly where it is regular;
    ``rhs`` (B, M, k) holds k right-hand sides of the one matrix ``a`` (B, M, M).

    Writing ``κ = 1/M + U y`` with ``U`` an orthonormal basis of ``Σκ = 0`` and projecting the rows on
    ``U`` (which removes the common λ) gives ``Uᵀ A U y = Uᵀ (rhs − A 1/M)``. An LU solve of this small
    system is backward stable whatever its condition number (ill-conditioned systems occur in AND of
    similar models), so the increments come out equal to float64 rounding, which squaring the condition
    number, as the normal equations of the full (M+1)×(M+1) system do, would not give. Where the system is
    truly singular (indistinguishable models) the minimum-norm solution of :func:`_min_norm_solve`
    solves it too, and is used, splitting the weight evenly; where it solves the system no better than
    LU would (a regular, ill-conditioned system), LU's solution is used. A sample takes the damped
    solution only where every column does, the exact one only where every column does, and NaN where
    its columns disagree. Nothing here waits for the device.
    """
    m, k = a.shape[-1], rhs.shape[-1]
    basis = _sum_zero_basis(m, a.dtype, a.device)  # (M, M−1)
    centre = _centre(m, a.dtype, a.device)
    reduced = basis.mT @ a @ basis  # (B, M−1, M−1)
    # (B·k, M) @ (M, M−1), one matrix product whatever k (a batched product rounds differently)
    target = ((rhs - (a @ centre)[..., None]).mT.reshape(-1, m) @ basis).reshape(-1, k, m - 1).mT  # (B, M−1, k)
    exact, _ = torch.linalg.solve_ex(reduced, target)  # info unchecked: a failed LU gives non-finite values
    damped = _min_norm_solve(reduced, target, rtol)
    both = torch.cat([damped, exact], -1)  # (B, M−1, 2k)
    # One pass for each solution's largest residual and the damped one's largest entry (B, 4k).
    residuals = ((reduced @ both).unflatten(-1, (2, k)) - target[:, :, None]).flatten(-2)
    peaks = torch.cat([residuals, both], -1).abs().amax(-2)
    damped_residual, exact_residual, damped_size = peaks[:, :k], peaks[:, k : 2 * k], peaks[:, 2 * k : 3 * k]
    bound = torch.finfo(torch.float64).eps * (reduced.abs().amax(dim=(-2, -1))[:, None] * damped_size + 1.0)
    # A non-finite exact solve has a NaN or ∞ residual: counted as ∞, the damped one is taken.
    use_damped = (damped_residual <= 1e3 * bound) | (damped_residual <= exact_residual.nan_to_num(nan=math.inf))
    y = torch.where(use_damped[:, None, :], damped, exact)
    kappa = centre[:, None] + basis @ y
    kappa = torch.where(torch.isfinite(kappa).all(-2, keepdim=True), kappa, 1.0 / m)
    if k == 1:
        return kappa
    mixed = use_damped.any(-1) & ~use_damped.all(-1)  # (B,): the columns took different kinds of solution
    return torch.where(mixed[:, None, None], torch.nan, kappa)


@functools.lru_cache(maxsize=16)
def _sum_zero_basis(m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An orthonormal basis (M, M−1) of the vectors summing to zero, made once per (M, dtype, device)."""
    helmert = torch.zeros(m, m - 1, dtype=torch.float64)
    for j in range(1, m):  # column j: j entries 1/j, then −1 (the Helmert contrasts), normalised
        helmert[:j, j - 1] = 1.0
        helmert[j, j - 1] = -float(j)
        helmert[:, j - 1] /= math.sqrt(j * (j + 1))
    return helmert.to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def _centre(m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The vector 1/M (M,), made once per (M, dtype, device)."""
    return torch.full((m,), 1.0 / m, dtype=torch.float64).to(dtype=dtype, device=device)


def _min_norm_solve(system: Tensor, rhs: Tensor, rtol: float) -> Tensor:
    """The minimum-norm least-squares solution of ``system · z = rhs`` (as ``pinv(system) @ rhs``),
    by iterated Tikhonov regularisation, with nothing that waits for the device.

    ``z ← z + (KᵀK + εI)⁻¹ Kᵀ(r − Kz)`` three times from ``z = 0``, with ``ε = rtol·‖K‖²_F`` and one
    Cholesky factorisation (``cholesky_ex`` checks no errors, so a CUDA device is not synchronised,
    whereas torch's ``pinv`` and SVD check theirs). Components along singular values σ of K shrink
    by ``(ε/(σ² + ε))³``: directions with σ² ≫ ε are solved to float64 accuracy, the null space of a
    singular K (indistinguishable models) stays at zero up to rounding (about 1e-16/rtol relative),
    and directions with σ² near ε are damped, which is why :func:`_and_weights_reduced` checks the
    residual and falls back on an exact solve. A failed factorisation gives NaN.
    """
    kt = system.mT
    normal = kt @ system
    damping = rtol * normal.diagonal(dim1=-2, dim2=-1).sum(-1)  # rtol · ‖K‖²_F
    normal.diagonal(dim1=-2, dim2=-1).add_(damping[..., None])  # KᵀK + εI, in place: one operation
    factor, info = torch.linalg.cholesky_ex(normal)
    z = torch.cholesky_solve(kt @ rhs, factor)
    for _ in range(2):  # refinements: each shrinks what the damping took by ε/(σ² + ε)
        z = z + torch.cholesky_solve(kt @ (rhs - system @ z), factor)
    return torch.where((info == 0)[..., None, None], z, torch.nan)


def _and_weights_two(a: Tensor, rhs_gap: Tensor, atol: Tensor) -> Tensor:
    """The closed form for M = 2 (the paper's κ): eliminate κ₂ = 1 − κ₁ and λ.

    Row i reads ``Aᵢ₁κ₁ + Aᵢ₂(1 − κ₁) − λ = rhsᵢ``; subtracting the rows gives one linear equation
    in κ₁ (``rhs_gap`` = rhs₁ − rhs₂, (B,)). A slope at or below ``atol`` (indistinguishable models),
    or any non-finite input, gives
    κ = (½, ½), as the minimum-norm solution of the general case does. No host synchronisation,
    no matrix factorisation.
    """
    row_gap = a[:, 0] - a[:, 1]  # (B, 2)
    slope = row_gap[:, 0] - row_gap[:, 1]
    k1 = (rhs_gap - row_gap[:, 1]) / slope
    k1 = torch.nan_to_num(torch.where(slope.abs() > atol, k1, 0.5), nan=0.5, posinf=0.5, neginf=0.5)
    return torch.stack([k1, 1.0 - k1], dim=-1)


def Fixed(weights: Sequence[float]) -> "Product":  # noqa: N802 - a constructor, named like a combiner
    """Fixed weights κ for every sample and step (they need not sum to 1): the uncorrected product of all
    the models with these exponents, ``Product(exponents=weights, correct=False)``."""
    from .expressions import Product

    numbers = _number_tuple("weights", weights)
    _in_range([gain_problem(f"weights[{i}]", v) for i, v in enumerate(numbers or ())])
    return Product(None, numbers, correct=False)


def and_feedback_offsets(log_q: Tensor, feedback: float, log_weights: Tensor | None = None,
                         step_fraction: float = 1.0) -> Tensor:
    """The prescribed differences of one step for AND with feedback: ``−ρ ((ℓ_i − w_i) − mean_j(ℓ_j − w_j))``.

    Solved by :func:`and_weights` as ``target_offsets``, they take the share ρ off the tracked gap of
    ``log q_i − w_i`` at this step (on the expected increments, so the gap left is the step's noise). On a
    last step onto σ = 0 (``step_fraction`` 0) there is no increment to steer, and none is prescribed.

    Args:
        log_q: (B, M) tracked log-densities.
        feedback: ρ in (0, 1].
        log_weights: (M,) Eq. 18's offsets w, or None.
        step_fraction: the step's share of the trajectory; 0 on a step onto σ = 0.

    Returns:
        (B, M) float64.
    """
    gap = f64(log_q)
    if log_weights is not None:
        gap = gap - f64(log_weights)
    if step_fraction == 0.0:
        return torch.zeros_like(gap)
    return -feedback * (gap - gap.mean(-1, keepdim=True))


def Average(num_models: int) -> "Product":  # noqa: N802 - a constructor, named like the paper's baseline
    """The paper's "average of scores" baseline (Liu et al. 2022): κ = 1/M."""
    return Fixed(tuple([1.0 / num_models] * num_models))


def Sum(num_models: int) -> "Product":  # noqa: N802
    """Sum of scores (product of experts, Composable Diffusion): κ = 1 for every model."""
    return Fixed(tuple([1.0] * num_models))


def __getattr__(name: str):
    # ``superdiff.combine.And`` / ``.Or`` are the expression nodes (one And, one Or): ``And()`` without
    # children is AND over all the models. Imported on first use: expressions imports this module.
    if name in ("And", "Or"):
        from . import expressions

        return getattr(expressions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_combiner(combiner: object, num_models: int, what: str = "models") -> None:
    """Raise ``ValueError`` unless ``combiner`` is a combiner object that can weigh ``num_models``
    models (``what`` names them in the message: "prompts", "unets"): OR and AND need 2 or more, and
    weights or log-weights need one entry per model. A combiner without ``check_num_models`` (a
    user's own) is taken as it is."""
    if isinstance(combiner, (str, type)) or not callable(combiner) or not hasattr(combiner, "needs_system"):
        _refuse(
            "combiner",
            combiner,
            "pass a combiner object such as And(), Or(temperature=2.0) or Fixed((0.7, 0.3)), "
            "or build one from a mode name with make_combiner(mode, num_models)",
        )
    check = getattr(combiner, "check_num_models", None)
    if check is not None:
        check(num_models, what)


def make_combiner(
    mode: str,
    num_models: int,
    temperature: float = 1.0,
    log_weights: Sequence[float] | None = None,
    *,
    what: str = "models",
) -> Combiner:
    """The combiner for a mode name (one of :data:`MODES`), checked for ``num_models`` models.

    Pure (no model needed), so callers build it before loading anything. ``temperature`` applies to
    OR and is checked for every mode (a mistake there is a mistake whatever the mode);
    ``log_weights`` to OR and AND. ``what`` names the models in messages ("prompts", "unets").
    """
    if mode not in MODES:
        _refuse("mode", mode, f"use one of {MODES}")
    _check_temperature(temperature)
    if log_weights is not None and mode not in ("and", "or"):
        _refuse(
            "log_weights",
            log_weights,
            f"log_weights apply to mode 'or' (a bias) and 'and' (offsets), not {mode!r}; "
            "drop them or use one of those modes",
        )
    from .expressions import And, Or

    if mode == "or":
        combiner: Combiner = Or(temperature=temperature, log_weights=log_weights)
    elif mode == "and":
        combiner = And(log_weights=log_weights)
    elif num_models >= 1:
        combiner = Average(num_models) if mode == "average" else Sum(num_models)
    else:
        _refuse(what, [], f"pass at least one of the {what} to compose")
    check_combiner(combiner, num_models, what)
    return combiner
