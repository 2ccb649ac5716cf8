"""One helper of the per-step math: float64 without a call where a tensor is float64 already."""

from __future__ import annotations

import torch
from torch import Tensor


def f64(t: Tensor) -> Tensor:
    """``t`` as float64: ``t`` itself when it is already (a no-op ``.to`` still costs a dispatch, as much
    as an addition of small tensors, and a step makes dozens)."""
    return t if t.dtype == torch.float64 else t.to(torch.float64)
