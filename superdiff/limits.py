"""The library's numeric ranges and caps, derived once, and the end-of-run check for non-finite values.

**Gains** (:data:`MAX_GAIN` = 2²³). Every multiplicative weight a user sets (a product's exponents
β, NOT's strength γ, soft-min/max sharpness λ and OR's temperature T, and guidance w) ends up
multiplying the networks' outputs: the mixed prediction is ``Σ κᵢ x̂₀ⁱ`` (guided: ``x̂₀ᵘ + w(Σ κᵢ x̂₀ⁱ −
Σκ x̂₀ᵘ)``), and λ, T scale the log-densities in the node's softmax and the score Gram in its
Feynman–Kac weight. Network outputs carry at best float32's relative rounding ε = 2⁻²³, which each
weight multiplies: once a weight reaches 1/ε = 2²³ the rounding it carries is as large as the
outputs themselves, and no bit of the mixed prediction is significant. So each factor, and the
tree's total gain (the largest ``Σ|κ|`` its weights can give, times w), is bounded by 2²³
(λ and T also below by 2⁻²³, since the potential divides by them). Within the bound a float32
output up to 2¹⁰⁵ stays finite once weighted.

**Log-weights** (:data:`MAX_LOG_WEIGHT` = −ln(float32's smallest normal) ≈ 87.34). A log-weight ℓ
(OR's bias, AND's offset) stands for the factor ``e^ℓ``; beyond ±87.34 either ``e^ℓ`` or ``e^−ℓ``
is no longer a normal float32 number, so the weight is indistinguishable from 0 next to a weight
of 1 (use fewer leaves instead).

**Rows** (:data:`MAX_NETWORK_ROWS` = 2¹⁴ = 16384). One step evaluates every model (leaf), plus the
unconditional row under guidance, for every image × particle in one batched network call: rows =
images × particles × (leaves + 1). The cap is a bound, not a memory estimate: it is the command
line's batch of 1024 images × particles with 16 rows each (15 leaves and the unconditional row),
it leaves room for the exact-mixture runs of the tests and benchmarks (2048 samples × 3 models),
and it refuses the runs that grew past 11 GB (a 50-leaf product at 1024 particles: 51 200 rows;
``particles=10**6``).

**Depth** (:data:`MAX_DEPTH` = 64): how deeply an expression may nest (nodes from the root to a
leaf, and in the syntax parentheses, ``!`` and calls). Each level costs a few Python frames in
the parser and the recursive evaluation; 64 stays far inside Python's recursion limit.

**Non-finite values** (:class:`FiniteWatch`): the sampler records on the device, per step, whether
the samples, the tracked log-densities, the particles' log-weights and κ stayed finite, and reads
that record once at the end of the run (one host read per call, none per step); a run that went
non-finite raises :class:`NonFiniteError` naming the step and, for an expression, the node.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = [
    "MAX_GAIN", "MIN_SCALE", "MAX_LOG_WEIGHT", "MAX_NETWORK_ROWS", "MAX_DEPTH", "NonFiniteError",
    "gain_problem", "scale_problem", "log_weight_problem", "guidance_problem", "check_guidance", "rows_problem",
    "check_call_limits",
    "FiniteWatch",
]  # fmt: skip

_F32 = torch.finfo(torch.float32)
MAX_GAIN = 1.0 / _F32.eps  # 2**23 = 8388608
MIN_SCALE = _F32.eps  # 2**-23: the smallest sharpness / temperature (the potential divides by it)
MAX_LOG_WEIGHT = -math.log(_F32.tiny)  # 87.336...
MAX_NETWORK_ROWS = 2**14
MAX_DEPTH = 64


class NonFiniteError(RuntimeError):
    """A run whose samples, densities or weights became NaN or infinite although its inputs were in range."""


def _number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def gain_problem(name: str, value: float) -> str | None:
    """Whether ``|value|`` (an exponent, a strength) exceeds :data:`MAX_GAIN`."""
    if _number(value) and abs(value) > MAX_GAIN:
        return (f"{name}={value!r} is not valid; use a magnitude of at most 2**23 = {MAX_GAIN:.0f}: a weight that "
                "large multiplies the networks' float32 rounding until it is as large as their outputs")
    return None


def scale_problem(name: str, value: float) -> str | None:
    """Whether a sharpness or temperature lies outside [2⁻²³, 2²³]."""
    if _number(value) and value > 0 and not MIN_SCALE <= value <= MAX_GAIN:
        return (f"{name}={value!r} is not valid; use a number in [2**-23, 2**23] = [{MIN_SCALE:.3g}, {MAX_GAIN:.0f}]: "
                "it multiplies the log-densities and the scores' products, which lose every significant bit beyond")
    return None


def log_weight_problem(name: str, value: float) -> str | None:
    """Whether ``|value|`` (a log-weight) exceeds :data:`MAX_LOG_WEIGHT`."""
    if _number(value) and abs(value) > MAX_LOG_WEIGHT:
        return (f"{name}={value!r} is not valid; use a log-weight in [-{MAX_LOG_WEIGHT:.2f}, {MAX_LOG_WEIGHT:.2f}]: "
                "beyond it e^ℓ (or e^-ℓ) is not a normal float32 number: the weight is as good as 0 beside the others")
    return None


def distilled_guidance_problem(guidance: float | None, dtype: Any) -> str | None:
    """Whether a distilled guidance embedding (FLUX's ``guidance_scale``) is out of range: the transformer
    embeds guidance × 1000 sinusoidally in its ``dtype``, so the product must be a finite number there, and
    below 2²³ × 1000, past which float32 cannot resolve the embedding's phase."""
    if guidance is None or not _number(guidance) or not math.isfinite(guidance):
        return None
    limit = min(MAX_GAIN, torch.finfo(dtype).max / 1000 if dtype.is_floating_point else MAX_GAIN)
    if guidance <= limit:
        return None
    where = "it overflows" if limit < MAX_GAIN else "float32 no longer resolves its phase"
    return (f"guidance_scale={guidance:g} is not valid: the transformer embeds the distilled guidance × 1000 in "
            f"{str(dtype).replace('torch.', '')}, where {where}; use guidance_scale {limit:.6g} or less (FLUX.1-dev's "
            "default is 3.5)")


def guidance_problem(guidance: float | None, gain: float = 1.0, argument: str = "guidance_scale") -> str | None:
    """Whether guidance w times the combiner's ``gain`` (its largest ``Σ|κ|``) exceeds :data:`MAX_GAIN`."""
    if guidance is None or not _number(guidance) or not math.isfinite(guidance) or guidance * gain <= MAX_GAIN:
        return None
    limit = MAX_GAIN / gain
    of = "" if gain == 1.0 else f" times the composition's total weight {gain:g}"
    return (f"{argument}={guidance:g} is not valid: the guidance{of} multiplies the prediction by more than 2**23 = "
            f"{MAX_GAIN:.0f}, where the networks' float32 rounding is as large as their outputs; use {argument} "
            f"{limit:.6g} or less")


def check_guidance(guidance: float | None, combiner: Any, argument: str = "guidance_scale") -> None:
    """Raise ``ValueError`` where :func:`guidance_problem` finds one (the combiner's ``gain``, default 1)."""
    problem = guidance_problem(guidance, float(getattr(combiner, "gain", 1.0)), argument)
    if problem:
        raise ValueError(problem)


def check_call_limits(guidance: float | None, combiner: Any, samples: int, outputs: int) -> None:
    """A sampler's checks of this module's ranges before its first network call: guidance times the
    combiner's gain (:func:`check_guidance`) and the rows of one call, ``samples`` (images × particles)
    × ``outputs`` (the denoiser's, the unconditional one included)."""
    check_guidance(guidance, combiner)
    if samples * outputs > MAX_NETWORK_ROWS:
        raise ValueError(f"x has {samples} samples (images x particles) and the denoiser {outputs} outputs: "
                         f"{samples * outputs} rows in one network call, more than the cap of {MAX_NETWORK_ROWS} "
                         f"(superdiff.limits.MAX_NETWORK_ROWS); pass at most {max(1, MAX_NETWORK_ROWS // outputs)} "
                         "samples (fewer images or particles)")


def rows_problem(images: int, particles: int, outputs: int, unconditional: bool = False,
                 names: Sequence[str] = ("num_images", "particles")) -> str | None:
    """Whether one network call of ``images × particles × (outputs + unconditional)`` rows exceeds
    :data:`MAX_NETWORK_ROWS`; the message names the option to lower (``names``: images', particles')."""
    per_sample = outputs + bool(unconditional)
    rows = images * particles * per_sample
    if rows <= MAX_NETWORK_ROWS:
        return None
    image_option, particle_option = names
    what = f"{outputs} models" + (" + the unconditional row" if unconditional else "")
    head = (f"{images} image{'s' * (images != 1)} x {particles} particle{'s' * (particles != 1)} x ({what}) = {rows} "
            f"rows in one network call, more than the cap of {MAX_NETWORK_ROWS} (superdiff.limits.MAX_NETWORK_ROWS); ")
    if particles > 1 and images * per_sample <= MAX_NETWORK_ROWS:
        return head + f"lower {particle_option} to {MAX_NETWORK_ROWS // (images * per_sample)} or fewer"
    if particles * per_sample <= MAX_NETWORK_ROWS:
        return head + f"lower {image_option} to {MAX_NETWORK_ROWS // (particles * per_sample)} or fewer"
    return head + f"compose at most {MAX_NETWORK_ROWS - bool(unconditional)} models (leaves) in one call"


class FiniteWatch:
    """Whether a run stayed finite, recorded on the device step by step and read once at the end.

    :meth:`step` queues four reductions per step (no host read); :meth:`check` reads their record
    once, and only on failure looks further to name the step and the node."""

    KINDS = ("samples", "log-densities", "particle log-weights", "model weights κ")

    def __init__(self) -> None:
        self._flags: list[Tensor] = []
        self._kept: list[tuple[Tensor, tuple[Tensor, ...]]] = []  # references the sampler keeps anyway

    def step(self, x: Tensor, log_q: Tensor, log_w: Tensor, kappa: Tensor,
             node_weights: Sequence[Tensor] = ()) -> None:
        """Record one step: the state after it, the log-densities, log-weights and κ of the step."""
        self._flags.append(torch.stack([torch.isfinite(t).all() for t in (x, log_q, log_w, kappa)]))
        self._kept.append((log_q, tuple(node_weights)))

    def check(self, nodes: Sequence[Any] = (), leaves: Sequence[Any] | None = None) -> None:
        """Raise :class:`NonFiniteError` if any recorded step went non-finite, naming the step, what
        went non-finite, and where: the innermost node of an expression (``nodes``, in the order of
        the recorded node weights) whose weights did, else the models (``leaves``: their names)
        whose log-densities did."""
        if not self._flags:
            return
        finite = torch.stack(self._flags)  # (steps, 4)
        if bool(finite.all()):  # the one host read of the run
            return
        step = int((~finite).any(1).long().argmax())
        kinds = [k for k, ok in zip(self.KINDS, finite[step].tolist()) if not ok]
        log_q, weights = self._kept[step]
        bad_nodes = [i for i, w in enumerate(weights) if not bool(torch.isfinite(w).all())]
        bad_models = (~torch.isfinite(log_q)).any(0).nonzero().flatten().tolist()
        where = ""
        if bad_nodes and len(nodes) > bad_nodes[-1]:
            from .expressions import describe

            text = describe(nodes[bad_nodes[-1]])
            where = f" at node {text if len(text) <= 120 else text[:117] + '...'} (its weights over its children)"
        elif bad_models:
            names = [repr(leaves[i]) if leaves is not None and i < len(leaves) else str(i) for i in bad_models]
            where = f" (the log-densities of model{'s' if len(names) > 1 else ''} {', '.join(names)})"
        raise NonFiniteError(
            f"step {step + 1} of {len(self._flags)} produced non-finite (NaN or infinite) {', '.join(kinds)}{where}; "
            "nothing was returned. The inputs were within the library's ranges (superdiff.limits), so the model "
            "or the precision overflowed: try float32, smaller exponents, strengths or guidance, or fewer steps"
        )
