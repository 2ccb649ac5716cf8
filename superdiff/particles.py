"""Weighted particles: effective sample size, systematic resampling within groups, and selection.

A batch of ``B = G·K`` samples is G groups of K particles (group g is rows ``gK … gK+K−1``), one
group per output image; log-weights (B,) come from the Feynman–Kac corrections of
:mod:`superdiff.expressions`. Everything here is a pure function on tensors, and nothing waits for
the device: which groups resample is a mask, not a branch.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import Tensor

from .options import option_spec

__all__ = [
    "check_particles", "effective_sample_size", "systematic_ancestors", "resample_step", "select_particles",
    "group_uniforms", "WeightCollapseWarning", "COLLAPSE_FRACTION", "COLLAPSE_STEPS", "warn_if_collapsed",
]  # fmt: skip

#: A group has collapsed when its ESS (before a resampling decision, after the first step) falls below
#: ``1 + COLLAPSE_FRACTION · (K − 1)``: one particle then holds nearly all its weight.
COLLAPSE_FRACTION = 0.05
#: The warning needs collapses on this many steps: a product whose target exists collapsed on at most one
#: step from 50 steps on (none at 200), a not() of a child narrower than its reference on 3–13 (K = 4–64).
COLLAPSE_STEPS = 2


class WeightCollapseWarning(UserWarning):
    """The particles' weights collapsed onto one particle per group, step after step: the correction is
    unreliable, and the corrected target may not be normalisable (a not() whose child is narrower than its
    reference), in which case the samples follow no target."""


def warn_if_collapsed(ess_trace: Tensor, particles: int) -> None:
    """Warn (:class:`WeightCollapseWarning`) when groups' ESS (steps, G) fell below
    ``1 + COLLAPSE_FRACTION · (K − 1)`` on :data:`COLLAPSE_STEPS` steps or more; reads the trace back once,
    after sampling. K = 2 is not checked: at the default threshold it never resamples, so its ESS carries
    every step's spread. Measured on exact mixtures (``tests/test_expressions.py``): at 10–25 steps products
    collapse too, and their correction is then unreliable as well."""
    if particles < 3 or ess_trace.numel() == 0:
        return
    bound = 1.0 + COLLAPSE_FRACTION * (particles - 1)
    collapsed = (ess_trace < bound).any(-1)
    count = int(collapsed.sum())
    if count < COLLAPSE_STEPS:
        return
    first = int(collapsed.nonzero()[0, 0])
    warnings.warn(
        f"the particles' weights collapsed: a group's effective sample size fell below {bound:.3g} of {particles} "
        f"on {count} of {ess_trace.shape[0]} steps (first at step {first + 1}), so the correction is unreliable: "
        "take more steps or particles. If it persists, the corrected target may not be normalisable (e.g. "
        "not(child, reference) with a child narrower than its reference, or a strength too high) and the samples "
        "then follow no target.",
        WeightCollapseWarning,
        stacklevel=3,
    )


def check_particles(particles: object, resample_threshold: object, batch: int | None = None) -> None:
    """Raise ``ValueError`` unless ``particles`` is an integer ≥ 1 (dividing ``batch``, when given) and
    ``resample_threshold`` a number in (0, 1]."""
    option_spec("particles").check("particles", particles)  # the checks declared with the options
    option_spec("resample_threshold").check("resample_threshold", resample_threshold)
    if batch is not None and batch % particles:
        raise ValueError(
            f"particles={particles} does not divide the batch of {batch} samples; pass a batch of "
            "images × particles rows (group g is rows g·K … g·K+K−1)"
        )


def _groups(log_weights: Tensor, particles: int) -> Tensor:
    return log_weights.reshape(-1, particles)


def effective_sample_size(log_weights: Tensor, particles: int) -> Tensor:
    """Kish's ``(Σw)²/Σw²`` per group of ``particles``, computed from log-weights (non-finite ones
    count as zero weight; a group with no finite weight has ESS 0). Returns (G,) float64."""
    lw = _groups(log_weights.to(torch.float64), particles)
    lw = torch.nan_to_num(lw, nan=-math.inf, posinf=-math.inf)
    top = lw.amax(-1, keepdim=True)
    w = torch.where(torch.isfinite(top), torch.exp(lw - top), torch.zeros_like(lw))
    total = w.sum(-1)
    return torch.where(total > 0, total.square() / w.square().sum(-1).clamp_min(1e-300), torch.zeros_like(total))


def group_uniforms(groups: int, particles: int, generator: torch.Generator | Sequence[torch.Generator] | None,
                   device: torch.device) -> Tensor:
    """One U(0, 1) per group, from ``generator`` (a list: the first generator of each group)."""
    if isinstance(generator, (list, tuple)):
        draws = [torch.rand(1, generator=generator[g * particles], device=generator[g * particles].device,
                            dtype=torch.float64) for g in range(groups)]  # as one generator draws them
        return torch.cat([d.to(device=device, dtype=torch.float64) for d in draws])
    gen_device = generator.device if generator is not None else device
    return torch.rand(groups, generator=generator, device=gen_device, dtype=torch.float64).to(device)


def systematic_ancestors(log_weights: Tensor, particles: int, uniforms: Tensor) -> Tensor:
    """Systematic resampling within each group: K positions ``(u + k)/K`` on the group's normalised
    cumulative weights. ``uniforms`` (G,) in [0, 1). Returns (B,) global ancestor indices (long).
    Expected copies of a particle are K·wₖ exactly, with fewer random draws than multinomial."""
    lw = _groups(log_weights.to(torch.float64), particles)
    lw = torch.nan_to_num(lw, nan=-math.inf, posinf=-math.inf)
    w = torch.softmax(lw, -1)
    w = torch.where(torch.isfinite(w).all(-1, keepdim=True), w, 1.0 / particles)  # all −inf: uniform
    cumulative = w.cumsum(-1)
    cumulative = cumulative / cumulative[:, -1:]  # ends at 1 exactly: rounding leaves no position past it
    positions = (uniforms[:, None] + torch.arange(particles, device=lw.device, dtype=torch.float64)) / particles
    local = torch.searchsorted(cumulative, positions, right=True).clamp_max(particles - 1)
    offsets = torch.arange(lw.shape[0], device=lw.device)[:, None] * particles
    return (local + offsets).reshape(-1)


def resample_step(
    log_weights: Tensor, particles: int, threshold: float, uniforms: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Resample the groups whose ESS fell below ``threshold · particles``.

    Returns ``(ancestors (B,), new log-weights (B,), ESS before (G,), resampled mask (G,))``: groups
    that resample get systematic ancestors and zero log-weights, the others keep theirs (identity
    ancestors)."""
    ess = effective_sample_size(log_weights, particles)
    resampled = ess < threshold * particles
    identity = torch.arange(log_weights.shape[0], device=log_weights.device)
    ancestors = systematic_ancestors(log_weights, particles, uniforms)
    per_row = resampled.repeat_interleave(particles)
    ancestors = torch.where(per_row, ancestors, identity)
    new_log_weights = torch.where(per_row, torch.zeros_like(log_weights), log_weights)
    return ancestors, new_log_weights, ess, resampled


def select_particles(
    log_weights: Tensor, particles: int, generator: torch.Generator | Sequence[torch.Generator] | None = None
) -> Tensor:
    """One particle per group drawn with probability ∝ its weight (the group's draw from the
    weighted target). Returns (G,) global indices."""
    groups = log_weights.shape[0] // particles
    u = group_uniforms(groups, particles, generator, log_weights.device)
    lw = torch.nan_to_num(_groups(log_weights.to(torch.float64), particles), nan=-math.inf, posinf=-math.inf)
    w = torch.softmax(lw, -1)
    w = torch.where(torch.isfinite(w).all(-1, keepdim=True), w, 1.0 / particles)
    cumulative = w.cumsum(-1)
    cumulative = cumulative / cumulative[:, -1:]
    local = torch.searchsorted(cumulative, u[:, None], right=True).clamp_max(particles - 1)[:, 0]
    return local + torch.arange(groups, device=lw.device) * particles
