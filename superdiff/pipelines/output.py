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
    """

    images: Any
    log_densities: torch.Tensor
    log_density_trace: torch.Tensor
    kappa_trace: torch.Tensor
    timesteps: torch.Tensor | None = None
