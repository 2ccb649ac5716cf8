"""The output of every superdiff pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils import BaseOutput

__all__ = ["SuperDiffPipelineOutput"]


@dataclass
class SuperDiffPipelineOutput(BaseOutput):
    """Images and the superposition diagnostics of one call.

    ``images``: a list of PIL images, an (B, H, W, C) numpy array, a (B, C, H, W) tensor for
    ``output_type="pt"``, or the latents for ``output_type="latent"``.
    ``log_densities`` (B, M): each model's (prompt's) tracked log-density of the samples, relative
    to the starting noise, at the last density-tracked time (float64).
    ``log_density_trace`` (steps+1, B, M) and ``kappa_trace`` (steps, B, M): the same along the
    trajectory, and the weights κ used at every step (κ of a step is computed from the
    log-densities before it). ``timesteps``: the network timesteps of the steps.

    With ``expression=`` (:mod:`superdiff.expressions`): ``node_weight_trace`` one (steps, B,
    children) tensor per internal node; with ``particles=K``: each image is one particle drawn by
    weight from its group of K, ``log_weights`` (B,) its Feynman–Kac log-weight relative to its
    group, ``ess_trace`` (steps, B) its group's effective sample size before each step's
    resampling decision, ``resample_counts`` (B,) how often its group resampled.
    """

    images: Any
    log_densities: torch.Tensor
    log_density_trace: torch.Tensor
    kappa_trace: torch.Tensor
    timesteps: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None
    ess_trace: torch.Tensor | None = None
    resample_counts: torch.Tensor | None = None
    node_weight_trace: tuple[torch.Tensor, ...] | None = None
