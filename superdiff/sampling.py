"""Superposed samplers: the reverse SDE with Itô densities, and the probability-flow ODE with Prop. 5.

Both follow Algorithm 1: at every step each model's denoised prediction is computed in one call,
a combiner turns the tracked log-densities (and, for AND, the linear system of the increments)
into weights κ, the mixed prediction drives the step, and every model's log-density is updated.

Under classifier-free guidance (``guidance_scale=w``) the denoiser's last output is the
unconditional prediction ``x̂₀ᵘ``; the drift uses ``x̂₀ᵘ + w(Σκⱼ x̂₀ʲ − x̂₀ᵘ)`` while the densities
tracked are those of the unguided conditional models (paper §4.2 and the authors' SD code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._numeric import f64
from .combine import CombineInputs, Combiner, check_combiner
from .density import (
    QuadraticIncrementSystem,
    TransitionCoefficients,
    divergence_exact,
    divergence_hutchinson,
    divergence_hutchinson_vjp,
    expected_step_moments,
    ito_final_step_system,
    ito_increment_system,
    ito_log_density_increment,
    ito_quadratic_increment_system,
    jacobian_rayleigh_quotient,
    model_residuals,
    ode_increment_system,
    ode_log_density_rate,
    step_moments,
    transition_coefficients,
    tweedie_density_variance,
)
from .expressions import CompiledExpression, _where_rows, bind_combiner
from .limits import FiniteWatch, check_call_limits
from .models import Denoiser
from .options import SamplerOptions, option_spec
from .particles import check_particles, group_uniforms, resample_step, warn_if_collapsed
from .processes import Process

__all__ = ["SamplerOutput", "StepInfo", "sample_sde", "sample_ode", "mix_denoised", "prior_sample", "randn"]


@dataclass
class SamplerOutput:
    """Result of a superposed sampler.

    ``samples`` (B, *shape); ``log_densities`` (B, M) at the last density-tracked time;
    ``log_density_trace`` (steps+1, B, M); ``kappa_trace`` (steps, B, M); ``times`` (steps+1,).
    Log-densities and κ are float64; log-densities are relative to ``log_q_init`` (zeros unless given).

    With a composition expression (:mod:`superdiff.expressions`): ``log_weights`` (B,) the
    particles' Feynman–Kac log-weights at the end (None when nothing corrects and ``particles=1``),
    ``ess_trace`` (steps, G) each group's effective sample size before each step's resampling
    decision, ``resample_counts`` (G,) how often each group resampled, and ``node_weight_trace``
    one (steps, B, children) tensor per internal node. With resampling, every trace follows each
    final particle's ancestry.

    ``and_converged`` (steps, B) bool, for AND under ``density_variance="tweedie"``: whether each
    step's quadratic equal-density condition was solved (where not, that step kept the
    common-variance κ and scored with the common variance); True on steps that need no solve. For an
    expression with an And over mixture-type children (``(0 | 1) & 2``) also whether that And's
    condition was met to 1e-6 nats (:meth:`~superdiff.expressions.CompiledExpression.and_gap`); where
    it has no root the step left the children's potentials that far apart.
    """

    samples: Tensor
    log_densities: Tensor
    log_density_trace: Tensor
    kappa_trace: Tensor
    times: Tensor
    log_weights: Tensor | None = None
    ess_trace: Tensor | None = None
    resample_counts: Tensor | None = None
    node_weight_trace: tuple[Tensor, ...] | None = None
    and_converged: Tensor | None = None


@dataclass
class StepInfo:
    """Passed to ``callback`` after every step. The callback may return a tensor shaped like ``x``:
    it replaces the state for the next step (the tracked densities are not adjusted for it)."""

    step: int
    t: float
    x: Tensor
    denoised: Tensor
    kappa: Tensor
    log_q: Tensor


Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """Standard normal noise drawn in float32 on the generator's device, then cast and moved.

    CPU generators work for CUDA tensors, and a seed gives the same noise in every precision.
    The copy to a CUDA device goes through pinned memory without blocking, so a sampler that
    draws noise every step never waits for the device. A list of generators (as in diffusers)
    draws sample k of the batch from generator k, so a sample does not depend on its batch.
    """
    if isinstance(generator, (list, tuple)):
        _check_generators(generator, shape[0])
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    device = torch.device(device)
    gen_device = generator.device if generator is not None else device
    noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    if noise.device.type == "cpu" and device.type == "cuda":
        return noise.pin_memory().to(device=device, dtype=dtype, non_blocking=True)
    return noise.to(device=device, dtype=dtype)


def _check_generators(generators: Sequence[torch.Generator], batch: int) -> None:
    if len(generators) != batch or not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(
            f"a list of generators needs one torch.Generator per sample ({batch}), got {len(generators)} items; "
            "pass one generator per sample, or a single generator for the whole batch"
        )


def prior_sample(
    denoiser: Denoiser,
    batch_size: int,
    sample_shape: tuple[int, ...],
    generator: Generators = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    std: float | None = None,
    z: Tensor | None = None,
) -> Tensor:
    """The starting point ``std · z`` of the reverse process, ``z ~ N(0, I)`` drawn from ``generator``.

    ``std``: the prior's standard deviation, the process's ``prior_std()`` unless given (the
    pipelines pass their diffusers scheduler's ``init_noise_sigma``, which for σ-form schedulers
    with linspace spacing is σ_max rather than √(σ_max² + 1)). ``z``: a draw to use instead of
    drawing one (diffusers' ``latents=``), moved to ``device`` and ``dtype``.
    """
    std = denoiser.process.prior_std() if std is None else std
    shape = (batch_size, *sample_shape)
    z = randn(shape, generator, torch.device(device), dtype) if z is None else z.to(device=device, dtype=dtype)
    return std * z


def mix_denoised(
    denoised: Tensor,
    kappa: Tensor,
    x: Tensor,
    alpha: float,
    guidance_scale: float | None = None,
    unconditional: Tensor | None = None,
    affine: bool = True,
) -> Tensor:
    """The x̂₀ of the score mixture ``Σ κᵢ ∇log qᵢ`` (optionally guided).

    ``denoised`` (M, B, *shape), ``kappa`` (B, M). Without guidance, weights that need not sum to
    one (``affine=False``, a product of experts) add ``(1 − Σκ) x/α``, the x̂₀ of a zero score.
    """
    k = kappa if kappa.dtype == denoised.dtype else kappa.to(denoised.dtype)
    trailing = (None,) * (denoised.dim() - 2)  # κ as (M, B, 1, …): a view, never a copy
    weighted = (k.mT[(..., *trailing)] * denoised).sum(0)
    total = k.sum(-1)[(..., *trailing)]
    if guidance_scale is not None:
        assert unconditional is not None
        return unconditional + guidance_scale * (weighted - total * unconditional)
    if not affine:
        return weighted + (1.0 - total) * x / alpha
    return weighted


# ---------------------------------------------------------------------------------------------
# Validation shared by both samplers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    num_models: int
    guided: bool
    alphas: list[float]
    sigmas: list[float]
    combiner: CompiledExpression  # bound to the models (superdiff.expressions.bind_combiner)


def _check_call(
    denoiser: Denoiser,
    x: Tensor,
    combiner: Combiner,
    guidance_scale: float | None,
    log_q_init: Tensor | None,
    generator: Generators,
) -> tuple[int, bool]:
    """Check what a sampler is given besides its times; returns (M models, guided). The combiner
    checks itself against M (:func:`superdiff.combine.check_combiner`)."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor of shape (batch, *sample_shape), got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor (e.g. from prior_sample), got {x.dtype}")
    if isinstance(generator, (list, tuple)):
        _check_generators(generator, x.shape[0])
    sample_shape = getattr(denoiser, "sample_shape", None)
    if sample_shape is not None and tuple(x.shape[1:]) != tuple(sample_shape):
        raise ValueError(f"x has samples of shape {tuple(x.shape[1:])} but the denoiser's are {tuple(sample_shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf; pass a finite starting point (e.g. from prior_sample)")
    guided = guidance_scale is not None
    if guided and not (guidance_scale >= 0 and math.isfinite(guidance_scale)):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
    unconditional = bool(getattr(denoiser, "unconditional", False))
    if guided and not unconditional:
        raise ValueError(
            f"guidance_scale={guidance_scale} steers from an unconditional prediction, and this denoiser has none; "
            "build it with its null condition last and unconditional=True, or pass guidance_scale=None"
        )
    if unconditional and not guided:
        raise ValueError(
            "the denoiser's last output is unconditional (unconditional=True), which only guidance uses; pass a "
            "guidance_scale, or build the denoiser without its null condition"
        )
    m = denoiser.num_outputs - unconditional
    if log_q_init is not None and tuple(log_q_init.shape) != (x.shape[0], m):
        raise ValueError(
            f"log_q_init must have shape (batch, models) = {(x.shape[0], m)}, got {tuple(log_q_init.shape)}"
        )
    check_combiner(combiner, m)
    check_call_limits(guidance_scale, combiner, x.shape[0], denoiser.num_outputs)
    return m, guided


def _plan_times(
    process: Process, times: Tensor, last_may_be_data: bool, final_denoise: bool
) -> tuple[list[float], list[float]]:
    """α and σ at every time of a grid from noise to data (σ/α strictly decreasing), read once.

    ``last_may_be_data``: the SDE may end on σ = 0 (a deterministic last step), the ODE may not (its
    densities are undefined there). ``final_denoise``: the last step lands on σ = 0 whatever the last
    time says, so that time may repeat the one before (a DDPM/DDIM grid ending at timestep 0).
    """
    if times.dim() != 1 or times.numel() < 2:
        raise ValueError(f"times must be a 1-D grid of at least 2 points (steps >= 1), got shape {tuple(times.shape)}")
    if not bool(torch.isfinite(times).all()):
        raise ValueError("times contains NaN or inf")
    alphas = [float(v) for v in process.alpha(times).tolist()]  # one read each, not one per time
    sigmas = [float(v) for v in process.sigma(times).tolist()]
    for i in range(len(alphas) - 1):
        if not (sigmas[i] > 0):
            raise ValueError(f"σ must be > 0 before the last time; times[{i}]={float(times[i])} has σ={sigmas[i]}")
        noisier = sigmas[i] * alphas[i + 1] > sigmas[i + 1] * alphas[i]  # σ/α strictly decreasing
        if not noisier and not (final_denoise and i == len(alphas) - 2):
            raise ValueError(
                f"times must run from noise to data (σ/α strictly decreasing); step {i} goes from t={float(times[i])} "
                f"to t={float(times[i + 1])}"
            )
        if not (alphas[i + 1] > 0):
            raise ValueError(f"α must be > 0 after the first time; times[{i + 1}] has α={alphas[i + 1]}")
    if sigmas[-1] == 0 and not last_may_be_data:
        raise ValueError("the last time must have σ > 0 for this sampler (densities are undefined at σ = 0)")
    return alphas, sigmas


def _plan(
    denoiser: Denoiser,
    x: Tensor,
    times: Tensor,
    combiner: Combiner,
    guidance_scale: float | None,
    log_q_init: Tensor | None,
    generator: Generators,
    last_may_be_data: bool,
    final_denoise: bool = False,
) -> _Plan:
    """Every check a sampler makes before its first network call, and the grid's α and σ."""
    m, guided = _check_call(denoiser, x, combiner, guidance_scale, log_q_init, generator)
    alphas, sigmas = _plan_times(denoiser.process, times, last_may_be_data, final_denoise)
    if not getattr(combiner, "affine", True) and not guided and alphas[0] == 0:
        raise ValueError(
            "a combiner whose weights do not sum to 1 (e.g. 'sum') has no denoised form where α = 0; "
            "start below t = 1 or use guidance"
        )
    return _Plan(m, guided, alphas, sigmas, bind_combiner(combiner, m))


def _check_variances(process: Process, variance: str, density_variance: str) -> None:
    """Refuse Thm. 2's Euler variance on processes whose α vanishes at t = 1 (rectified flow, VP cosine).

    There ``g² = 2σ² ∂_t log(σ/α)`` is not integrable, S²/a² grows without bound on the noisiest
    steps, and the densities do not converge with the steps.
    """
    for name, value in (("variance", variance), ("density_variance", density_variance)):
        if value == "euler" and not (float(process.alpha(1.0)) > 1e-12):
            raise ValueError(
                f"{name}='euler' (Thm. 2's S²/a²) does not converge on {type(process).__name__}, whose α vanishes "
                "at t = 1; use 'posterior' or 'forward'"
            )


def _state_from_callback(returned: object, x: Tensor) -> Tensor:
    """A callback may return a tensor to replace the state (as diffusers' ``callback_on_step_end``
    returns new latents); the tracked densities are not adjusted for such an edit."""
    if returned is None:
        return x
    if not isinstance(returned, Tensor) or returned.shape != x.shape:
        raise ValueError(
            f"a sampler callback returns None or a new state shaped like x {tuple(x.shape)}, got "
            f"{tuple(returned.shape) if isinstance(returned, Tensor) else type(returned).__name__}"
        )
    return returned.to(device=x.device, dtype=x.dtype)


def _split(out: Tensor, plan: _Plan) -> tuple[Tensor, Tensor | None]:
    if plan.guided:
        return out[: plan.num_models], out[plan.num_models]
    return out, None


def _system_base(denoised: Tensor, unconditional: Tensor | None, guidance_scale: float | None) -> tuple[Tensor, float]:
    if unconditional is not None and guidance_scale is not None:
        return unconditional, guidance_scale
    return denoised.mean(0), 1.0


def _score_gram(denoised: Tensor, x: Tensor, alpha: float, sigma: float) -> Tensor:
    """``⟨sᵢ, sⱼ⟩`` (B, M, M) of the models' scores ``sᵢ = (α x̂₀ⁱ − x)/σ²`` at x, in float64."""
    batch = x.shape[0]
    scores = (alpha * denoised.reshape(denoised.shape[0], batch, -1) - f64(x.reshape(1, batch, -1)))
    scores = (scores / (sigma * sigma)).transpose(0, 1)  # (B, M, d)
    return scores @ scores.mT


_Weights = tuple[Tensor, Tensor | None, tuple[Tensor, ...]]  # κ, Feynman–Kac increment, node weights


def _weigh(combiner: CompiledExpression, inputs: CombineInputs) -> _Weights:
    """κ, the Feynman–Kac log-weight increment (expressions that correct) and the node weights."""
    step = combiner.step(inputs)
    return f64(step.kappa), step.log_weight_increment, step.node_weights


def _quadratic_system_weights(
    combiner: CompiledExpression, inputs: CombineInputs, system: QuadraticIncrementSystem
) -> tuple[tuple[_Weights, _Weights], Tensor]:
    """κ for increments ``A κ + b + r φ(κ)`` (:class:`~superdiff.density.QuadraticIncrementSystem`), from
    a combiner that solves linear systems and never learns which system it was given.

    At a fixed value t of φ the system ``(A, b + t r)`` is linear; its solution is affine in t,
    ``κ(t) = κ₀ + t κ₁``, so ``t = φ(κ(t))`` is the scalar quadratic ``p₂ t² + (p₁ − 1) t + p₀ = 0``, whose
    root that tends to φ(κ₀) as the variances meet is taken (``t = 2 p₀ / ((1 − p₁) + √((1 − p₁)² −
    4 p₂ p₀))``). One call of the combiner, on the rows stacked three times, solves ``inputs``' own
    (common-variance) system and the ones at t = 0 and t = 1. A combiner that declares its solve affine in
    b (``affine_in_offset``: :attr:`~superdiff.expressions.CompiledExpression.affine_in_offset`) has answered
    already: κ(t) and its node weights are read off those solves, and a sample is solved where the quadratic
    has a finite real root (it need not when κ is large on ill-conditioned steps). A combiner that solves
    offsets as columns of one system (``solves_offset_columns``: an And over three or more models) answers
    b and b + r as two columns of one call instead, and is read the same way. Any other combiner (an AND of mixtures
    inside an expression, a user's own) is called again at
    ``t = φ(κ(t))`` for the κ, Feynman–Kac term and node weights, and a sample is solved where that call
    also reproduced κ(t) to 1e-8 of its size. Returns ((solved, common-variance) weights, solved mask).
    Nothing here waits for the device.
    """
    affine = getattr(combiner, "affine_in_offset", False)
    columns = not affine and getattr(combiner, "solves_offset_columns", False)
    common, at_b, at_b_r = _weights_at_b_and_b_plus_r(combiner, inputs, system, columns)
    k0 = at_b[0]
    k1 = at_b_r[0] - k0
    t, discriminant = _quadratic_root(system, k0, k1)
    kappa_t = k0 + t[:, None] * k1
    if affine or columns:  # its answer at t is κ(t): only the root can fail (NaN columns leave no root)
        nodes_t = tuple(n0 + t[:, None] * (n1 - n0) for n0, n1 in zip(at_b[2], at_b_r[2]))
        return ((kappa_t, None, nodes_t), common), (discriminant >= 0) & torch.isfinite(t)
    phi_t = torch.nan_to_num(system.phi(kappa_t))
    result = _weigh(combiner, replace(inputs, increment_matrix=system.increment_matrix,
                                      increment_offset=system.increment_offset + phi_t[:, None] * system.row_weights))
    move = (result[0] - kappa_t).norm(dim=-1) / (1.0 + kappa_t.norm(dim=-1))
    solved = (discriminant >= 0) & (move <= 1e-8)  # a non-finite κ moves by NaN or ∞: never solved
    return (result, common), solved


def _weights_at_b_and_b_plus_r(combiner: CompiledExpression, inputs: CombineInputs, system: QuadraticIncrementSystem,
                               columns: bool) -> tuple[_Weights, _Weights, _Weights]:
    """One combiner call for the weights of ``inputs``' own (common-variance) system and of the quadratic system's
    linear ones at t = 0 and t = 1: the rows stacked three times, or, for a combiner that solves offsets as
    columns (:attr:`~superdiff.expressions.CompiledExpression.solves_offset_columns`), twice, with b and b + r
    as two columns of one system (one factorisation each; the common rows' two columns are equal)."""
    batch, b = system.row_weights.shape[0], system.increment_offset
    if columns:
        offsets = torch.cat([torch.stack([inputs.increment_offset] * 2, -1),
                             torch.stack([b, b + system.row_weights], -1)])
        stacked = _stacked_inputs(inputs, torch.cat([inputs.increment_matrix, system.increment_matrix]), offsets)
        kappas, _, nodes = _weigh(combiner, stacked)  # (2B, M, 2); no Feynman–Kac term
        return tuple((kappas[rows, :, j], None, tuple(n[rows, :, j] for n in nodes))
                     for rows, j in ((slice(None, batch), 0), (slice(batch, None), 0), (slice(batch, None), 1)))
    stacked = _stacked_inputs(inputs, torch.cat([inputs.increment_matrix, system.increment_matrix,
                                                 system.increment_matrix]),
                              torch.cat([inputs.increment_offset, b, b + system.row_weights]))
    kappas, fks, nodes = _weigh(combiner, stacked)
    return tuple((kappas[rows], None if fks is None else fks[rows], tuple(n[rows] for n in nodes))
                 for rows in (slice(None, batch), slice(batch, 2 * batch), slice(2 * batch, None)))


def _quadratic_root(system: QuadraticIncrementSystem, k0: Tensor, k1: Tensor) -> tuple[Tensor, Tensor]:
    """The root t of ``t = φ(κ₀ + t κ₁)`` that tends to φ(κ₀) as the variances meet, and the discriminant
    of ``p₂ t² + (p₁ − 1) t + p₀ = 0`` (B,) (no real root where it is negative)."""
    kk = torch.stack([k0, k1], -1)  # (B, M, 2)
    quad = kk.mT @ (system.phi_matrix @ kk)  # (B, 2, 2): κₐᵀ Q κ_b
    lin = (system.phi_vector[:, None] @ kk)[:, 0]  # (B, 2): v·κ₀, v·κ₁
    p0 = quad[:, 0, 0] + lin[:, 0]  # φ(κ₀)
    slope = 1 - (quad[:, 0, 1] + quad[:, 1, 0] + lin[:, 1])  # 1 − p₁
    discriminant = torch.addcmul(slope * slope, quad[:, 1, 1], p0, value=-4.0)
    return 2 * p0 / (slope + discriminant.clamp_min(0).sqrt()), discriminant


def _stacked_inputs(inputs: CombineInputs, matrices: Tensor, offsets: Tensor) -> CombineInputs:
    """``inputs`` for the rows stacked ``offsets.shape[0] // B`` times, each copy with its own system
    (``matrices``, ``offsets``): combiners weigh every sample on its own, so one call solves them all."""
    copies = offsets.shape[0] // inputs.log_q.shape[0]

    def tile(v: Tensor | None) -> Tensor | None:
        return None if v is None else torch.cat([v] * copies)  # as v.repeat(copies, 1, …), several times cheaper

    return replace(inputs, log_q=tile(inputs.log_q), increment_matrix=matrices, increment_offset=offsets,
                   score_gram=tile(inputs.score_gram))


def _follow_ancestry(traces: list[list[Tensor]], initial: list[Tensor], ancestors: list[Tensor]) -> None:
    """Reindex recorded traces so each final particle's row is its own history: ``traces[k][i]`` was
    recorded after step i's resampling, ``ancestors[i]`` (B,) maps slots after step i to slots before it,
    and ``initial`` entries precede step 0."""
    if not ancestors:
        return
    lineage = torch.arange(ancestors[0].shape[0], device=ancestors[0].device)
    for i in range(len(ancestors) - 1, -1, -1):
        for trace in traces:
            trace[i] = trace[i][lineage]
        lineage = ancestors[i][lineage]
    for k in range(len(initial)):
        initial[k] = initial[k][lineage]


# ---------------------------------------------------------------------------------------------
# Reverse SDE: plan, then state + step (+ resample), then finish
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SdePlan:
    """What every step of :func:`sample_sde` reads and no step changes: the checked call, the
    grid's transition coefficients, and which estimator, kernel and weighting the run uses."""

    plan: _Plan
    times: Tensor  # (steps+1,) float64
    times_host: list[float]  # read once: the loop itself never reads a tensor back to the host
    coefs: list[TransitionCoefficients]
    combiner: CompiledExpression  # bound to the models
    guidance_scale: float | None
    tracked_steps: int  # steps with a finite density increment (all but a last step onto σ = 0)
    model_variances: bool  # density_variance="tweedie": one kernel variance per model and sample
    kernel_tweedie: bool  # variance="tweedie": the step's own kernel per sample
    needs_scores: bool  # the combiner corrects (Feynman–Kac) and reads the score Gram matrix
    nonlinear_and: bool  # an And over mixture-type children, solved iteratively: report where it was met
    weighted: bool  # particles carry log-weights
    fk_scale: float  # the corrections enter times w under guidance
    particles: int
    resample_threshold: float

    @property
    def steps(self) -> int:
        return len(self.coefs)


@dataclass(frozen=True)
class SdeState:
    """The rows the loop carries from step to step (a sample, or a particle of a group).

    ``x`` (B, *shape); ``log_q`` (B, M) float64 tracked log-densities; ``log_w`` (B,) float64
    Feynman–Kac log-weights; ``x0_mix`` (B, *shape), ``kappa`` (B, M), ``converged`` (B,) and
    ``node_weights`` what the last step used; ``previous`` each model's x̂₀ⁱ and residual uᵢ of the
    last step (M, B, d) and ‖uᵢ‖² (M, B) for ``density_variance="tweedie"``; ``previous_step`` the mixed x̂₀, the
    noise w (B, d) and κ of the last step for ``variance="tweedie"``.
    """

    x: Tensor
    log_q: Tensor
    log_w: Tensor
    converged: Tensor
    x0_mix: Tensor | None = None
    kappa: Tensor | None = None
    node_weights: tuple[Tensor, ...] = ()
    previous: tuple[Tensor, Tensor, Tensor] | None = None
    previous_step: tuple[Tensor, Tensor, Tensor] | None = None

    def reindexed(self, rows: Tensor) -> "SdeState":
        """Every row-indexed field taken at ``rows`` (B,): the state of the resampled particles."""
        prev = None if self.previous is None else tuple(v[:, rows] for v in self.previous)
        prev_step = None if self.previous_step is None else tuple(v[rows] for v in self.previous_step)
        return SdeState(
            self.x[rows], self.log_q[rows], self.log_w[rows], self.converged[rows],
            None if self.x0_mix is None else self.x0_mix[rows], None if self.kappa is None else self.kappa[rows],
            tuple(w[rows] for w in self.node_weights), prev, prev_step,
        )  # fmt: skip


@dataclass
class _SdeTraces:
    """The per-step records of a run, appended after each step's resampling."""

    log_q: list[Tensor]
    kappa: list[Tensor] = field(default_factory=list)
    converged: list[Tensor] = field(default_factory=list)
    nodes: list[tuple[Tensor, ...]] = field(default_factory=list)
    ancestors: list[Tensor] = field(default_factory=list)
    ess: list[Tensor] = field(default_factory=list)
    resample_counts: Tensor | None = None

    def record(self, state: SdeState) -> None:
        self.log_q.append(state.log_q)
        self.kappa.append(state.kappa)
        self.converged.append(state.converged)
        self.nodes.append(state.node_weights)

    def record_resampling(self, ancestors: Tensor, ess: Tensor, resampled: Tensor) -> None:
        self.ancestors.append(ancestors)
        self.ess.append(ess)
        self.resample_counts = self.resample_counts + resampled.long()


def _plan_sde(denoiser: Denoiser, x: Tensor, times: Tensor, combiner: Combiner, guidance_scale: float | None,
              log_q_init: Tensor | None, generator: Generators, variance: str | None, density_variance: str,
              final_denoise: bool, particles: int, resample_threshold: float) -> SdePlan:
    """Every check before the first network call, and the transition coefficients of every step."""
    plan = _plan(denoiser, x, times, combiner, guidance_scale, log_q_init, generator, last_may_be_data=True,
                 final_denoise=final_denoise)
    needs_scores = plan.combiner.needs_scores
    if variance is None:
        variance = "forward" if needs_scores else "posterior"
    for name, value in (("variance", variance), ("density_variance", density_variance)):
        option_spec(name).check(name, value)  # declared with the options (superdiff.options)
    model_variances, kernel_tweedie = density_variance == "tweedie", variance == "tweedie"
    density_variance = "forward" if model_variances else density_variance  # the first step's, and the fallback's
    variance = "posterior" if kernel_tweedie else variance  # β̃: the first step's, and the base of Tweedie's
    _check_variances(denoiser.process, variance, density_variance)
    check_particles(particles, resample_threshold, x.shape[0])
    steps = times.numel() - 1
    final_zero = final_denoise or plan.sigmas[-1] == 0
    coefs = [
        transition_coefficients(plan.alphas[i], plan.sigmas[i], plan.alphas[i + 1],
                                0.0 if (final_zero and i == steps - 1) else plan.sigmas[i + 1], variance,
                                density_variance)
        for i in range(steps)
    ]  # fmt: skip
    return SdePlan(
        plan, times, times.tolist(), coefs, plan.combiner, guidance_scale, max(steps - (1 if final_zero else 0), 1),
        model_variances, kernel_tweedie, needs_scores, bool(getattr(plan.combiner, "nonlinear_and", False)),
        needs_scores or particles > 1,
        1.0 if guidance_scale is None else float(guidance_scale), particles, resample_threshold,
    )  # fmt: skip


def _initial_state(p: SdePlan, x: Tensor, log_q_init: Tensor | None) -> SdeState:
    """The rows at ``times[0]``: tracked densities from ``log_q_init`` (zeros: they cancel in κ), and
    the particles' initial log-weight when the expression corrects."""
    batch = x.shape[0]
    log_w = torch.zeros(batch, dtype=torch.float64, device=x.device)
    if p.needs_scores:
        # FKC: the particles start from the prior N(0, (α² + σ²) I) (unit-variance data) while the corrected
        # target there is e^φ(log p_T, …): their initial log-weight is (D − 1) log p_T(x) + const.
        prior_var = p.plan.alphas[0] ** 2 + p.plan.sigmas[0] ** 2
        log_prior = -0.5 * f64(x.reshape(batch, -1)).square().sum(-1) / prior_var
        log_w = log_w + p.fk_scale * p.combiner.initial_log_weight(log_prior)
    log_q = (
        torch.zeros(batch, p.plan.num_models, dtype=torch.float64, device=x.device)
        if log_q_init is None
        else log_q_init.to(device=x.device, dtype=torch.float64)
    )
    converged = torch.ones(batch, dtype=torch.bool, device=x.device)  # and_converged where no step solves
    return SdeState(x, log_q, log_w, converged)


def _step(p: SdePlan, denoiser: Denoiser, state: SdeState, i: int, generator: Generators) -> SdeState:
    """One step of Algorithm 1: the network call, κ, the kernel move, the Itô increment, the Feynman–Kac weight."""
    c = p.coefs[i]
    # Every model's x̂₀ⁱ (and the unconditional x̂₀ᵘ) in one batched network call. One float64 copy serves
    # κ, the mixing and the densities: κ is unbounded (AND of similar models reaches 1e3–1e7), so Σκᵢx̂₀ⁱ
    # is never formed in fp16/bf16.
    denoised, unconditional = _split(f64(denoiser(state.x, p.times[i])), p.plan)
    if c.final:
        state, fk = _final_step(p, state, c, denoised, unconditional)
    else:
        state, fk = _noisy_step(p, state, c, denoised, unconditional, generator)
    if fk is not None:  # Feynman–Kac (Skreta et al., Prop. 3.1): log w += ∫ G dτ, times w under guidance
        state = replace(state, log_w=state.log_w + p.fk_scale * fk)
    return state


def _final_step(p: SdePlan, state: SdeState, c: TransitionCoefficients, denoised: Tensor,
                unconditional: Tensor | None) -> tuple[SdeState, Tensor | None]:
    """The last step onto σ = 0: deterministic, onto the mixed x̂₀; no density increment exists there.
    AND lands equally far from every x̂₀ⁱ, the limit of Prop. 6's condition as the step's noise vanishes."""
    system = (None, None)
    if p.combiner.needs_system:
        system = ito_final_step_system(denoised, *_system_base(denoised, unconditional, p.guidance_scale))
    gram = _score_gram(denoised, state.x, c.alpha_s, c.sigma_s) if p.needs_scores else None
    kappa, fk, nodes = _weigh(p.combiner, CombineInputs(state.log_q, system[0], system[1], 0.0, gram, c.S2))
    x0_mix = _mix(p, denoised, kappa, state.x, c, unconditional).to(state.x.dtype)
    converged = torch.ones_like(state.converged)
    return replace(state, x=x0_mix, x0_mix=x0_mix, kappa=kappa, node_weights=nodes, converged=converged), fk


def _mix(p: SdePlan, denoised: Tensor, kappa: Tensor, x: Tensor, c: TransitionCoefficients,
         unconditional: Tensor | None) -> Tensor:
    """The mixed (and guided) x̂₀ that drives the step (Eq. 15): x̂₀ᵘ + w(Σκⱼx̂₀ʲ − x̂₀ᵘ), or Σκⱼx̂₀ʲ."""
    return mix_denoised(denoised, kappa, x, c.alpha_s, p.guidance_scale, unconditional, p.combiner.affine)


def _noisy_step(p: SdePlan, state: SdeState, c: TransitionCoefficients, denoised: Tensor,
                unconditional: Tensor | None, generator: Generators) -> tuple[SdeState, Tensor | None]:
    """A step from s to t > 0: draw w, weigh (κ), track every model's density (Thm. 1), move."""
    x = state.x
    # The Gaussian increment w ~ N(0, V), drawn before κ: AND's κ is solved for this very w (Prop. 6).
    noise, noise_var = _draw_increment(p, state, c, denoised, unconditional, generator)
    noise64 = f64(noise)
    density_var = _model_variances(p, state, c, denoised)
    kappa, fk, nodes, density_var, converged = _step_weights(p, state, c, denoised, unconditional, noise64,
                                                             noise_var, density_var)
    x0_mix64 = _mix(p, denoised, kappa, x, c, unconditional)
    # Itô densities (Thm. 1 discretised as Eq. 89): Δ log qᵢ = log r̃ᵢ(y | x) − log k(x | y).
    residuals = model_residuals(denoised, x0_mix64, noise64, c)
    norm2 = torch.linalg.vecdot(residuals, residuals)  # ‖uᵢ‖² (M, B): this step's density, the next one's variance
    log_q = state.log_q + ito_log_density_increment(denoised, x0_mix64, x, noise64, c, density_var, residuals,
                                                    norm2)
    if p.nonlinear_and:  # an And over mixtures is solved iteratively: report where its condition was not met
        converged = converged & (p.combiner.and_gap(state.log_q, log_q, 1.0 / p.tracked_steps) <= 1e-6)
    previous = (denoised, residuals, norm2) if p.model_variances else None
    previous_step = (x0_mix64, noise64.reshape(x.shape[0], -1), kappa) if p.kernel_tweedie else None
    # The move (Thm. 2's mean, Tweedie's E[x_t | x_s]): y = c_x x + c_0 x̂₀ᵐⁱˣ + w.
    x0_mix = x0_mix64.to(x.dtype)
    x = c.c_x * x + c.c_0 * x0_mix + noise
    return SdeState(x, log_q, state.log_w, converged, x0_mix, kappa, nodes, previous, previous_step), fk


def _draw_increment(p: SdePlan, state: SdeState, c: TransitionCoefficients, denoised: Tensor,
                    unconditional: Tensor | None, generator: Generators) -> tuple[Tensor, float | Tensor]:
    """w ~ N(0, V): V from Thm. 2's kernel (``variance``), or under ``variance="tweedie"`` the step's own
    kernel β̃ + c₀² Cov[x₀ | x], with the mixed x̂₀'s Jacobian read, as the estimator's, from the last step
    (mixed with its κ, so it is known before this κ); the first step uses β̃. Returns w and V (a number,
    or (B,) per sample)."""
    x = state.x
    if not (p.kernel_tweedie and state.previous_step is not None):
        return math.sqrt(c.var) * randn(tuple(x.shape), generator, x.device, x.dtype), c.var
    last_mix, last_noise, last_kappa = state.previous_step
    mixed_now = _mix(p, denoised, last_kappa, x, c, unconditional)
    lam = jacobian_rayleigh_quotient(last_noise[None], last_mix[None], mixed_now[None])
    step_var = tweedie_density_variance(c, lam)[0]  # (B,)
    scale = step_var.sqrt().to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return scale * randn(tuple(x.shape), generator, x.device, x.dtype), step_var


def _model_variances(p: SdePlan, state: SdeState, c: TransitionCoefficients, denoised: Tensor) -> Tensor | None:
    """``density_variance="tweedie"``: each model's kernel variance Vᵢ (M, B), β̃ + c₀² Cov[x₀ | x] (Tweedie's
    second-order identity), its Jacobian trace read from the last step's residual and this x̂₀; None on the
    first step and for a common variance."""
    if not (p.model_variances and state.previous is not None):
        return None
    last_denoised, last_residuals, last_norm2 = state.previous
    trace = jacobian_rayleigh_quotient(last_residuals, last_denoised, denoised, last_norm2)
    return tweedie_density_variance(c, trace)


def _step_weights(p: SdePlan, state: SdeState, c: TransitionCoefficients, denoised: Tensor,
                  unconditional: Tensor | None, noise64: Tensor, noise_var: float | Tensor,
                  density_var: Tensor | None):
    """κ (B, M), the Feynman–Kac increment, the node weights, the variances the step is scored with, and
    whether AND's condition was solved (B,): OR's softmax of the tracked log-densities (Algorithm 1), AND's
    system of this step's increments (Eqs. 75–78), an expression's tree (with its scores' Gram matrix)."""
    system, quadratic = (None, None), None
    if p.combiner.needs_system:
        base = _system_base(denoised, unconditional, p.guidance_scale)
        moments = step_moments(denoised, base[0], noise64)
        if getattr(p.combiner, "expected_system", False):  # κ from the expected increments, not this w
            moments = expected_step_moments(moments, noise_var)
        if density_var is None:
            system = ito_increment_system(denoised, *base, noise64, c, moments=moments)
        else:  # one variance per model: the quadratic system, and the common-variance one beside it
            quadratic = ito_quadratic_increment_system(moments, base[1], c, density_var)
            system = (quadratic.common_matrix, quadratic.common_offset)
    # Feynman–Kac corrections (superdiff.expressions) read the models' score Gram and g²dτ ≈ S².
    gram = _score_gram(denoised, state.x, c.alpha_s, c.sigma_s) if p.needs_scores else None
    inputs = CombineInputs(state.log_q, system[0], system[1], 1.0 / p.tracked_steps, gram, c.S2)
    if quadratic is None:
        return (*_weigh(p.combiner, inputs), density_var, torch.ones_like(state.converged))
    # One variance per model makes the increments quadratic in κ (one scalar quadratic shared by every row).
    # A sample where its solution fails keeps the common-variance κ and scores this step with the common
    # variance V̄, for which that κ is exact.
    (solved, common), converged = _quadratic_system_weights(p.combiner, inputs, quadratic)
    kappa = _where_rows(converged, solved[0], common[0])
    fk = None if common[1] is None else _where_rows(converged, solved[1], common[1])
    nodes = tuple(_where_rows(converged, n, o) for n, o in zip(solved[2], common[2]))
    density_var = torch.where(converged[None], density_var, quadratic.common_variance[None])
    return kappa, fk, nodes, density_var, converged


def _resample(p: SdePlan, state: SdeState, generator: Generators) -> tuple[SdeState, Tensor, Tensor, Tensor]:
    """Weighted particles: resample (systematic) each group whose ESS fell below the threshold, reindexing
    the whole state (a mask, no sync). Returns the state, ancestors (B,), ESS (G,) and the resampled mask."""
    groups = state.x.shape[0] // p.particles
    u = group_uniforms(groups, p.particles, generator, state.x.device)
    ancestors, log_w, ess, resampled = resample_step(state.log_w, p.particles, p.resample_threshold, u)
    return replace(state.reindexed(ancestors), log_w=log_w), ancestors, ess, resampled


def _finish(p: SdePlan, state: SdeState, traces: _SdeTraces) -> SamplerOutput:
    """The output, every trace following each final particle's ancestry."""
    taken = len(traces.kappa)
    nodes = [list(ws) for ws in zip(*traces.nodes)]
    if traces.ancestors:
        n = len(traces.ancestors)
        head = [traces.log_q[1 : n + 1], traces.kappa[:n], traces.converged[:n], *(ws[:n] for ws in nodes)]
        initial = [traces.log_q[0]]
        _follow_ancestry(head, initial, traces.ancestors)
        traces.log_q[: n + 1] = initial + head[0]
        traces.kappa[:n], traces.converged[:n] = head[1], head[2]
        for ws, h in zip(nodes, head[3:]):
            ws[:n] = h
    batch = state.x.shape[0]
    kappas = torch.stack(traces.kappa) if traces.kappa else state.log_q.new_empty(0, batch, p.plan.num_models)
    node_weight_trace = tuple(torch.stack(ws) for ws in nodes) if nodes else None
    # AND's condition under one variance per model, or an And over mixtures: where each step met it
    quadratic_and = (p.model_variances and p.combiner.needs_system) or p.nonlinear_and
    return SamplerOutput(
        state.x, state.log_q, torch.stack(traces.log_q), kappas, p.times[: taken + 1],
        log_weights=state.log_w if p.weighted else None,
        ess_trace=torch.stack(traces.ess) if traces.ess else None,
        resample_counts=traces.resample_counts if p.particles > 1 else None,
        node_weight_trace=node_weight_trace,
        and_converged=torch.stack(traces.converged) if quadratic_and and traces.converged else None,
    )  # fmt: skip


#: The bare samplers' options when none are given: the dataclass's defaults, except one particle per row (the
#: caller gives the rows and their grouping) and a last step onto ``times[-1]`` as the caller gave it (a
#: pipeline's ``final_denoise=True`` lands on σ = 0 because a diffusers grid stops short of it).
#: :func:`sample_sde`'s keyword defaults are read from here; :func:`sample_ode`, which has no kernel,
#: particles or step onto σ = 0, takes an options object only with these values.
SAMPLER_DEFAULTS = SamplerOptions(final_denoise=False, particles=1)


def _with_options(options: SamplerOptions | None, **keywords: object) -> tuple:
    """The sampler's option values: the keywords as given, or, with ``options``, its fields (a keyword
    moved from its default beside ``options`` is refused: which one was meant is unclear)."""
    if options is None:
        return tuple(keywords.values())
    if not isinstance(options, SamplerOptions):
        raise ValueError(f"options={options!r} is not valid; pass a superdiff.options.SamplerOptions or None")
    for name, value in keywords.items():
        if value != getattr(SAMPLER_DEFAULTS, name):
            raise ValueError(f"{name}={value!r} is given beside options=SamplerOptions(...); pass it in the options "
                             f"(options.replace({name}=...)) or as a keyword without options, not both")
    # particles=None (the pipelines' "by composition") is 1 here: the caller gives the rows and their grouping.
    return tuple(getattr(options, name) if (name, getattr(options, name)) != ("particles", None) else 1
                 for name in keywords)


@torch.no_grad()
def sample_sde(
    denoiser: Denoiser,
    x: Tensor,
    times: Tensor,
    combiner: Combiner,
    *,
    guidance_scale: float | None = None,
    log_q_init: Tensor | None = None,
    generator: Generators = None,
    callback: Callable[[StepInfo], Tensor | None] | None = None,
    variance: str | None = SAMPLER_DEFAULTS.variance,
    density_variance: str = SAMPLER_DEFAULTS.density_variance,
    final_denoise: bool = SAMPLER_DEFAULTS.final_denoise,
    progress: bool = False,
    interrupt: Callable[[], bool] | None = None,
    particles: int = SAMPLER_DEFAULTS.particles,
    resample_threshold: float = SAMPLER_DEFAULTS.resample_threshold,
    options: SamplerOptions | None = None,
) -> SamplerOutput:
    """Superposed reverse-SDE sampling with Itô log-densities (Algorithm 1, Theorem 1).

    Plan (every check, before any network call), then per step: one network call, κ, the kernel
    move, the Itô increment of every model's density, the Feynman–Kac weight, and resampling of
    weighted particles (:class:`SdeState`, :func:`_step`, :func:`_resample`). A last time with σ = 0
    is a deterministic step onto the mixed x̂₀, where the densities stay at their last value.

    Args:
        denoiser: M models (plus an unconditional output when ``denoiser.unconditional``), called
            as ``denoiser(x, t) -> (num_outputs, B, *shape)`` once per step.
        x: (B, *shape) the starting noise (e.g. from :func:`prior_sample`).
        times: (steps+1,) process times from noise to data.
        combiner: an expression node or a flat combiner (``And()``, ``Or()``, ``Fixed(...)``, a
            compiled expression, or a callable ``CombineInputs -> κ`` with ``needs_system``).
        guidance_scale: classifier-free guidance w (needs an unconditional output); None: unguided.
        log_q_init: (B, M) log-densities at ``times[0]``; zeros by default (they cancel in κ).
        generator: one generator, or one per sample (a sample's noise then does not depend on the
            rest of its batch).
        callback: called with a :class:`StepInfo` after every step; may return a new state.
        variance: the step's kernel variance: ``"posterior"`` (DDPM's β̃), ``"forward"``, ``"euler"``
            (Thm. 2) or ``"tweedie"`` (per sample, β̃ + c₀² Cov[x₀ | x]); None: ``"posterior"``, or
            ``"forward"`` for an expression that corrects (its weights assume the diffusion g²).
        density_variance: the estimator's kernel variance: ``"tweedie"`` (each model's own per sample,
            :func:`~superdiff.density.tweedie_density_variance`; AND's condition is then quadratic in
            κ, and a sample where it has no solution keeps the common-variance κ), or one variance for
            all models (``"forward"``, ``"posterior"``, ``"euler"``).
        final_denoise: land the last step on σ = 0 whatever ``times[-1]`` says, as diffusers' Euler
            schedulers do. The five options default to :data:`SAMPLER_DEFAULTS`' fields.
        progress: show a tqdm bar.
        interrupt: asked before every step; once it returns True the sampler stops and returns the
            steps taken.
        particles: K, the size of each group of weighted particles (group g is rows gK … gK+K−1); a
            group whose effective sample size falls below ``resample_threshold · K`` is resampled.
        resample_threshold: in (0, 1].
        options: the five options above as one :class:`~superdiff.options.SamplerOptions` (its
            ``final_denoise`` defaults to True, as in the pipelines; its ``time_grid`` is the
            pipelines'). A keyword moved from its default beside ``options`` is a ``ValueError``.

    Returns:
        :class:`SamplerOutput`: samples (B, *shape), float64 log-densities (B, M) and their trace
        (steps+1, B, M), κ trace (steps, B, M), the times reached, and for weighted particles their
        log-weights, ESS trace and resampling counts; every trace follows each final particle's ancestry.
    """
    variance, density_variance, final_denoise, particles, resample_threshold = _with_options(
        options, variance=variance, density_variance=density_variance, final_denoise=final_denoise,
        particles=particles, resample_threshold=resample_threshold)
    times = torch.as_tensor(times, dtype=torch.float64)
    p = _plan_sde(denoiser, x, times, combiner, guidance_scale, log_q_init, generator, variance, density_variance,
                  final_denoise, particles, resample_threshold)
    state = _initial_state(p, x, log_q_init)
    traces = _SdeTraces([state.log_q])
    traces.resample_counts = torch.zeros(x.shape[0] // particles, dtype=torch.long, device=x.device)
    watch = FiniteWatch()  # non-finite values, recorded on the device and read once after the loop
    for i in tqdm(range(p.steps), disable=not progress, desc="superdiff"):
        if interrupt is not None and interrupt():
            break
        state = _step(p, denoiser, state, i, generator)
        watch.step(state.x, state.log_q, state.log_w, state.kappa, state.node_weights)
        if p.particles > 1 and i < p.steps - 1:
            state, ancestors, ess, resampled = _resample(p, state, generator)
            traces.record_resampling(ancestors, ess, resampled)
        traces.record(state)
        if callback is not None:
            info = StepInfo(i, p.times_host[i + 1], state.x, state.x0_mix, state.kappa, state.log_q)
            state = replace(state, x=_state_from_callback(callback(info), state.x))
    watch.check(getattr(p.combiner, "nodes", ()), getattr(p.combiner, "leaves", None))
    if p.needs_scores and len(traces.ess) > 1:
        # One read, after sampling: the weights' sign of a target that does not exist (step 0 carries the
        # prior's initial weight, which in many dimensions alone can hold a group's ESS near 1).
        warn_if_collapsed(torch.stack(traces.ess[1:]), p.particles)
    return _finish(p, state, traces)


# ---------------------------------------------------------------------------------------------
# Probability-flow ODE
# ---------------------------------------------------------------------------------------------

OdeMethod = Literal["euler", "heun", "dopri5"]


@dataclass
class _OdeRates:
    velocity: Tensor
    log_q_rate: Tensor
    kappa: Tensor
    denoised_mix: Tensor


def _ode_rates(
    denoiser: Denoiser,
    x: Tensor,
    log_q: Tensor,
    t: float,
    combiner: Combiner,
    plan: _Plan,
    guidance_scale: float | None,
    divergence: str,
    probe: Tensor | None,
    span: float,
) -> _OdeRates:
    """Velocity dx/dt and d log qᵢ/dt (forward time) of the superposed probability-flow ODE at (x, t)."""
    p = denoiser.process
    alpha, sigma = float(p.alpha(t)), float(p.sigma(t))
    d_alpha, d_sigma = float(p.d_alpha(t)), float(p.d_sigma(t))
    t_tensor = torch.tensor(t, dtype=torch.float64)

    def conditional(z: Tensor) -> Tensor:
        return denoiser(z, t_tensor)

    with torch.enable_grad():
        if divergence == "exact":
            out, div = divergence_exact(conditional, x)
        else:
            assert probe is not None
            estimate = divergence_hutchinson if divergence == "hutchinson" else divergence_hutchinson_vjp
            out, div = estimate(conditional, x, probe)
    denoised, unconditional = _split(out.detach().to(torch.float64), plan)  # float64, as in sample_sde
    div = div.detach()[: plan.num_models]
    system = (None, None)
    if combiner.needs_system:
        base, scale = _system_base(denoised, unconditional, guidance_scale)
        a_mat, b_vec = ode_increment_system(denoised, base, scale, div, x, alpha, sigma, d_alpha, d_sigma)
        system = (-a_mat, -b_vec)  # per unit of reverse time τ = −t, the direction we integrate
    kappa = combiner(CombineInputs(log_q, system[0], system[1], 1.0 / span)).to(torch.float64)
    x0_mix = mix_denoised(denoised, kappa, x, alpha, guidance_scale, unconditional, combiner.affine)
    velocity = d_alpha * x0_mix + d_sigma * (x - alpha * x0_mix) / sigma
    rate = ode_log_density_rate(denoised, x0_mix, div, x, alpha, sigma, d_alpha, d_sigma)
    return _OdeRates(velocity.to(x.dtype), rate, kappa, x0_mix.to(x.dtype))


def _rademacher(x: Tensor, generator: Generators) -> Tensor:
    return randn(tuple(x.shape), generator, x.device, x.dtype).sign()


def sample_ode(
    denoiser: Denoiser,
    x: Tensor,
    times: Tensor,
    combiner: Combiner,
    *,
    method: OdeMethod = "euler",
    divergence: Literal["exact", "hutchinson", "hutchinson_vjp"] = "hutchinson",
    guidance_scale: float | None = None,
    log_q_init: Tensor | None = None,
    generator: torch.Generator | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    callback: Callable[[StepInfo], Tensor | None] | None = None,
    progress: bool = False,
    options: SamplerOptions | None = None,
) -> SamplerOutput:
    """Superposed probability-flow ODE with log-densities from Prop. 5 (Eq. 14 for OR).

    ``divergence="exact"`` costs one JVP per dimension (small d only); ``"hutchinson"`` one JVP
    per evaluation with a Rademacher probe (``"hutchinson_vjp"``: the same estimate by reverse
    mode, cheaper for convolutions on CPU; fresh probes per step for Euler/Heun, fixed for the
    adaptive ``"dopri5"``, which integrates the augmented state ``(x, log q)`` with torchdiffeq
    and reports values at ``times``).

    ``options``: a :class:`~superdiff.options.SamplerOptions` shared with :func:`sample_sde` runs; the ODE
    has no step kernel, particles or last step onto σ = 0, so each of those fields must be at
    :data:`SAMPLER_DEFAULTS`' value (``ValueError`` naming the field otherwise). A run that goes
    non-finite raises :class:`~superdiff.limits.NonFiniteError` naming the step, as :func:`sample_sde` does.
    """
    _check_ode_options(options)
    if method not in ("euler", "heun", "dopri5"):
        raise ValueError(f"method must be 'euler', 'heun' or 'dopri5', got {method!r}")
    if divergence not in ("exact", "hutchinson", "hutchinson_vjp"):
        raise ValueError(f"divergence must be 'exact', 'hutchinson' or 'hutchinson_vjp', got {divergence!r}")
    times = torch.as_tensor(times, dtype=torch.float64)
    plan = _plan(denoiser, x, times, combiner, guidance_scale, log_q_init, generator, last_may_be_data=False)
    steps = times.numel() - 1
    span = float(times[0] - times[-1])
    batch = x.shape[0]
    log_q = (
        torch.zeros(batch, plan.num_models, dtype=torch.float64, device=x.device)
        if log_q_init is None
        else log_q_init.to(device=x.device, dtype=torch.float64)
    )

    def rates(z: Tensor, lq: Tensor, t: float, probe: Tensor | None) -> _OdeRates:
        if probe is None and divergence != "exact":
            probe = _rademacher(z, generator)
        return _ode_rates(denoiser, z, lq, t, plan.combiner, plan, guidance_scale, divergence, probe, span)

    if method == "dopri5":
        return _sample_odeint(rates, x, log_q, times, generator, divergence, rtol, atol)

    log_q_trace, kappa_trace = [log_q], []
    watch, no_weights = FiniteWatch(), log_q.new_zeros(batch)  # as in sample_sde: read once after the loop
    for i in tqdm(range(steps), disable=not progress, desc="superdiff-ode"):
        s, t = float(times[i]), float(times[i + 1])
        h = t - s
        k1 = rates(x, log_q, s, None)
        if method == "euler":
            x_next = x + h * k1.velocity
            log_q_next = log_q + h * k1.log_q_rate
        else:
            x_pred, lq_pred = x + h * k1.velocity, log_q + h * k1.log_q_rate
            k2 = rates(x_pred, lq_pred, t, None)
            x_next = x + 0.5 * h * (k1.velocity + k2.velocity)
            log_q_next = log_q + 0.5 * h * (k1.log_q_rate + k2.log_q_rate)
        x, log_q = x_next, log_q_next
        watch.step(x, log_q, no_weights, k1.kappa)
        log_q_trace.append(log_q)
        kappa_trace.append(k1.kappa)
        if callback is not None:
            x = _state_from_callback(callback(StepInfo(i, t, x, k1.denoised_mix, k1.kappa, log_q)), x)
    watch.check(getattr(plan.combiner, "nodes", ()), getattr(plan.combiner, "leaves", None))
    return SamplerOutput(x, log_q, torch.stack(log_q_trace), torch.stack(kappa_trace), times)


def _check_ode_options(options: SamplerOptions | None) -> None:
    """Refuse an options object whose fields ask for what the ODE does not do (see :func:`sample_ode`)."""
    if options is None:
        return
    if not isinstance(options, SamplerOptions):
        raise ValueError(f"options={options!r} is not valid; pass a superdiff.options.SamplerOptions or None")
    for name in ("variance", "density_variance", "final_denoise", "particles", "resample_threshold"):
        value, default = getattr(options, name), getattr(SAMPLER_DEFAULTS, name)
        if value != default and not (name == "particles" and value is None):  # None: 1 for the bare samplers
            raise ValueError(f"options.{name}={value!r} does not apply to sample_ode, which has no step kernel, "
                             f"particles or last step onto σ = 0; pass options.replace({name}={default!r}) "
                             "(superdiff.sampling.SAMPLER_DEFAULTS), or use sample_sde")


def _sample_odeint(
    rates, x: Tensor, log_q: Tensor, times: Tensor, generator, divergence: str, rtol: float, atol: float
) -> SamplerOutput:
    from torchdiffeq import odeint

    probe = _rademacher(x, generator) if divergence != "exact" else None

    t_lo, t_hi = float(times.min()), float(times.max())

    def func(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        # dopri5 may probe past the last time, where a process can be undefined (σ² < 0).
        r = rates(state[0], state[1], min(max(float(t), t_lo), t_hi), probe)
        return r.velocity, r.log_q_rate.to(state[1].dtype)

    t_grid = times.to(x.device)
    xs, lqs = odeint(func, (x, log_q), t_grid, rtol=rtol, atol=atol, method="dopri5")
    kappas = torch.stack([rates(xs[i], lqs[i], float(times[i]), probe).kappa for i in range(times.numel() - 1)])
    watch, no_weights = FiniteWatch(), lqs.new_zeros(x.shape[0])
    for i in range(times.numel() - 1):  # the values reported after step i
        watch.step(xs[i + 1], lqs[i + 1], no_weights, kappas[i])
    watch.check()
    return SamplerOutput(xs[-1], lqs[-1], lqs, kappas, times)
