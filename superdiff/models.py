"""Score models as denoisers: ``(x, t) -> x̂₀`` for every model or condition, in one batched call.

A *denoiser* is any callable with

* ``process``: the :class:`~superdiff.processes.Process` its times refer to;
* ``num_outputs``: how many predictions one call returns (models, prompts, plus an
  unconditional one under guidance);
* ``unconditional``: True when the last of them is the unconditional prediction x̂₀ᵘ that
  classifier-free guidance steers from (the samplers then need a ``guidance_scale``);
* ``__call__(x, t) -> (num_outputs, B, *shape)``: denoised predictions at the state x (B, *shape)
  and the scalar time t.

:class:`NetworkDenoiser` adapts a torch module or function predicting ε, v, x₀, a score or a flow
velocity, evaluating all its conditions in one forward pass; :func:`stack_denoisers` joins
separately trained models. Exact mixtures (:mod:`superdiff.analytic`) follow the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, TypeVar

import torch
from torch import Tensor

from .processes import PREDICTIONS, Process, to_denoised

__all__ = ["Denoiser", "NetworkDenoiser", "StackedDenoiser", "batched_network_call", "stack_denoisers"]

T = TypeVar("T")


def cached_conditions(cache: dict, conditions: Any, key: tuple, make: Callable[[], T]) -> T:
    """``make()`` (the conditions moved to the device and repeated over the batch), built once and
    reused while ``key`` (batch, device, ...), the inference mode and the ``conditions`` object stay
    the same and its tensors are not edited in place, so a sampling step copies nothing from the
    host. ``cache`` keeps one entry; copies made under ``torch.inference_mode`` are kept apart, as
    they cannot enter autograd. (In-place edits of inference tensors cannot be seen: torch keeps no
    version counter for them.)"""
    key = (*key, torch.is_inference_mode_enabled(), _versions(conditions))
    hit = cache.get(key)
    if hit is None or hit[0] is not conditions:
        hit = (conditions, make())
        cache.clear()
        cache[key] = hit
    return hit[1]


def _versions(value: Any) -> tuple:
    """The version counters of the tensors in ``value`` (nested dicts too): they change on in-place edits."""
    if isinstance(value, dict):
        return tuple(v for item in value.values() for v in _versions(item))
    if isinstance(value, Tensor):
        return (None,) if value.is_inference() else (value._version,)
    return ()


class Denoiser(Protocol):
    process: Process
    #: The last output is the unconditional prediction (classifier-free guidance), not a model.
    unconditional: bool

    @property
    def num_outputs(self) -> int: ...

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor: ...


def _identity_time(t: Tensor) -> Tensor:
    return t


@dataclass
class NetworkDenoiser:
    """Wrap ``network(x, t[, condition]) -> output`` of type ``prediction`` under ``process``.

    With ``conditions`` (M, ...) the network is called once on the batch repeated M times, each
    copy with its condition: (M·B, *shape) inputs, one forward pass. ``time_input`` maps the
    process time to what the network expects (for diffusers: the training timestep).
    ``unconditional=True``: the last condition is the null one of classifier-free guidance.
    """

    network: Callable[..., Tensor]
    process: Process
    prediction: str = "epsilon"
    conditions: Tensor | None = None
    time_input: Callable[[Tensor], Tensor] = _identity_time
    dtype: torch.dtype | None = None
    unconditional: bool = False
    _repeated: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.conditions is not None and not isinstance(self.conditions, Tensor):
            raise ValueError(
                "conditions must be one tensor with a row per condition (M, ...), got "
                f"{type(self.conditions).__name__}; stack a list of condition tensors with torch.stack"
            )
        check_unconditional(self.unconditional, self.num_outputs)

    @property
    def num_outputs(self) -> int:
        return 1 if self.conditions is None else int(self.conditions.shape[0])

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        p = self.process
        t = torch.as_tensor(t, dtype=torch.float64)
        batch = x.shape[0]
        if self.conditions is None:
            call = self.network
        else:
            cond = self.conditions
            repeated = cached_conditions(self._repeated, cond, (batch, x.device),
                                         lambda: cond.to(x.device).repeat_interleave(batch, dim=0))

            def call(x_in: Tensor, t_in: Tensor) -> Tensor:
                return self.network(x_in, t_in, repeated)

        out = batched_network_call(call, x, self.num_outputs, float(self.time_input(t)), self.dtype, self.prediction)
        return to_denoised(
            out,
            self.prediction,
            x[None],
            float(p.alpha(t)),
            float(p.sigma(t)),
            float(p.d_alpha(t)),
            float(p.d_sigma(t)),
        )


def check_unconditional(unconditional: bool, num_outputs: int) -> None:
    """An unconditional output needs a conditional one beside it."""
    if unconditional and num_outputs < 2:
        raise ValueError(
            f"unconditional=True marks the last of {num_outputs} output(s) as the unconditional one, which leaves "
            "no model to guide; give the conditions of the models first and the null condition last"
        )


def batched_network_call(
    call: Callable[[Tensor, Tensor], Any],
    x: Tensor,
    num_outputs: int,
    timestep: float,
    dtype: torch.dtype | None,
    prediction: str,
) -> Tensor:
    """One forward pass for every condition: ``call(x_in, t_in)`` on ``x`` (B, *shape) repeated
    ``num_outputs`` times (k-major, as conditions are repeated), cast to the network's ``dtype``,
    with the scalar ``timestep`` filled on the device (no host-to-device copy, no sync, per step).

    Returns the raw output as (num_outputs, B, *shape) in x's dtype, after checking it is one
    ``prediction`` per input row: a tuple, a diffusers output object or a learned variance in extra
    channels is refused with what to do instead.
    """
    x_in = x.to(dtype or x.dtype).repeat(num_outputs, *([1] * (x.dim() - 1)))
    t_in = torch.full((x_in.shape[0],), timestep, dtype=torch.float32, device=x.device)
    out = call(x_in, t_in)
    if not isinstance(out, Tensor):
        raise ValueError(
            f"the network returned a {type(out).__name__}, not a tensor; wrap it to return the prediction "
            "(for a diffusers model, its .sample) or use superdiff.pipelines.DiffusersDenoiser"
        )
    if out.shape != x_in.shape:
        raise ValueError(
            f"the network returned shape {tuple(out.shape)} for inputs of shape {tuple(x_in.shape)}; it must return "
            f"one {prediction} prediction per input row, shaped like the input (slice off a learned variance)"
        )
    return out.to(x.dtype).reshape(num_outputs, *x.shape)


@dataclass
class StackedDenoiser:
    """Several denoisers under one process, their outputs concatenated in order."""

    parts: tuple[Denoiser, ...]

    @property
    def process(self) -> Process:
        return self.parts[0].process

    @property
    def num_outputs(self) -> int:
        return sum(p.num_outputs for p in self.parts)

    @property
    def unconditional(self) -> bool:
        return bool(getattr(self.parts[-1], "unconditional", False))

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        return torch.cat([p(x, t) for p in self.parts], dim=0)


def stack_denoisers(denoisers: Sequence[Denoiser]) -> Denoiser:
    """Join separately trained denoisers; they must share one process (else their times disagree)."""
    if len(denoisers) == 0:
        raise ValueError("stack_denoisers needs at least one denoiser")
    first = denoisers[0].process
    for i, d in enumerate(denoisers[:-1]):
        if getattr(d, "unconditional", False):
            raise ValueError(
                f"denoiser {i} ends with an unconditional output, but only the last denoiser of a stack may: "
                "guidance steers every model from one unconditional prediction, the stack's last output"
            )
    for i, d in enumerate(denoisers[1:], start=1):
        if d.process != first:
            raise ValueError(
                f"denoiser {i} uses process {d.process!r} but denoiser 0 uses {first!r}; models composed in "
                "one sampler must share a noising process (convert one, e.g. with DiscreteSigma for Euler schedulers)"
            )
    return denoisers[0] if len(denoisers) == 1 else StackedDenoiser(tuple(denoisers))
