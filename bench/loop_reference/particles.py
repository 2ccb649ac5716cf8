"""Weighted particles: effective sample size, systematic resampling within groups, and selection.

A batch of ``B = G·K`` samples is G groups of K particles (group g is rows ``gK … gK+K−1``), one
group per output image; log-weights (B,) come from the Feynman–Kac corrections of
:mod:`superdiff.expressions`. Everything here is a pure function on tensors, and nothing waits for
the device: which groups resample is a mask, not a branch.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "check_particles", "effective_sample_size", "systematic_ancestors", "resample_step", "select_particles",
    "group_uniforms",
]  # fmt: skip


def check_particles(particles: object, resample_threshold: object, batch: int | None = None) -> None:
    """Raise ``ValueError`` unless ``particles`` is an integer ≥ 1 (dividing ``batch``, when given) and
    ``resample_threshold`` a number in (0, 1]."""
    if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
        raise ValueError(f"particles={particles!r} is not valid; use an integer >= 1 (1: no weighted particles)")
    if (
        isinstance(resample_threshold, bool)
        or not isinstance(resample_threshold, (int, float))
        or not (0 < resample_threshold <= 1)
    ):
        raise ValueError(
            f"resample_threshold={resample_threshold!r} is not valid; use a number in (0, 1]: a group resamples "
            "when its effective sample size falls below threshold × particles (e.g. 0.5)"
        )
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
