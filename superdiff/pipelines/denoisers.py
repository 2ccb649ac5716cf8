"""diffusers networks as superdiff denoisers, and diffusers schedulers as time grids.

:class:`DiffusersDenoiser` adapts a UNet/transformer to the denoiser protocol of
:mod:`superdiff.models`: one forward pass on the batch repeated for every condition (M prompts
plus the unconditional/negative one), with the network's inputs scaled and its ε / v / x₀ /
velocity output converted to the denoised x̂₀ at the boundary (:func:`superdiff.processes.to_denoised`).

:func:`schedule_from_scheduler` reads a diffusers scheduler's ``set_timesteps`` grid and maps it
onto a core process: σ-form schedulers (Euler & co, ``init_noise_sigma > 1``) onto
:class:`~superdiff.processes.DiscreteSigma`, VP schedulers (DDPM, DDIM, DPM-Solver, ...) onto
:class:`~superdiff.processes.DiscreteVP`, flow-matching schedulers onto
:class:`~superdiff.processes.RectifiedFlow`. Only the grid and the process come from the
scheduler; the steps themselves are superdiff's reverse SDE (:func:`superdiff.sampling.sample_sde`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..models import batched_network_call, cached_conditions, check_unconditional
from ..processes import DiscreteSigma, DiscreteVP, Process, RectifiedFlow, to_denoised

__all__ = [
    "DiffusersDenoiser",
    "Schedule",
    "schedule_from_scheduler",
    "process_of_scheduler",
    "check_one_process",
    "check_unet_stack",
    "WithSharedInputs",
    "prediction_of_scheduler",
]


def _expand(value: Any, batch: int, dtype: torch.dtype, device: torch.device) -> Any:
    """Repeat each condition ``batch`` times along dim 0 (k-major, like ``x.repeat``), casting floats."""
    if isinstance(value, dict):
        return {k: _expand(v, batch, dtype, device) for k, v in value.items()}
    if isinstance(value, Tensor):
        value = value.to(device)
        if value.is_floating_point():
            value = value.to(dtype)
        return value.repeat_interleave(batch, dim=0)
    return value


@dataclass
class DiffusersDenoiser:
    """A diffusers network (``UNet2DConditionModel``, ``UNet2DModel``, ``SD3Transformer2DModel``, ...)
    as a denoiser with ``num_outputs`` conditions evaluated in ONE forward pass.

    ``unconditional=True``: the last condition is the unconditional (negative) one of guidance.
    ``conditions``: keyword arguments of the network whose tensors have a leading dim of
    ``num_outputs`` (nested dicts such as SDXL's ``added_cond_kwargs`` too); each is repeated
    over the batch. For a state x (B, *shape) the network sees ``x_in`` (num_outputs·B, *shape),
    condition k on rows ``k·B … k·B+B−1``, and the timestep ``timestep(t)`` for every row.

    ``scale_input``: the network was trained on variance-preserving inputs while the process is in
    σ-form (Stable Diffusion with Euler): it sees ``x / sqrt(α² + σ²)`` and its output is read in
    that VP frame (α_VP = α c, σ_VP = σ c). Inputs are cast to the network's dtype, outputs back to
    the state's dtype (float32 state, fp16/bf16 networks on CUDA).
    """

    network: Callable[..., Any]
    process: Process
    prediction: str
    timestep: Callable[[Tensor], Tensor]
    conditions: dict[str, Any] = field(default_factory=dict)
    num_outputs: int = 1
    scale_input: bool = False
    dtype: torch.dtype | None = None
    unconditional: bool = False

    def __post_init__(self) -> None:
        check_unconditional(self.unconditional, self.num_outputs)
        if self.scale_input and self.prediction == "flow":
            raise ValueError("scale_input applies to VP-trained networks, not to flow (velocity) networks")
        if self.dtype is None:  # read once: diffusers' ModelMixin.dtype walks every submodule
            self.dtype = getattr(self.network, "dtype", None)
        self._expanded: dict[tuple, dict[str, Any]] = {}

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        p = self.process
        t = torch.as_tensor(t, dtype=torch.float64)
        alpha, sigma = float(p.alpha(t)), float(p.sigma(t))
        c_in = 1.0 / math.sqrt(alpha * alpha + sigma * sigma) if self.scale_input else 1.0
        dtype = self.dtype or x.dtype
        x_scaled = x * c_in
        kwargs = cached_conditions(
            self._expanded, self.conditions, (x.shape[0], dtype, x.device),
            lambda: {name: _expand(v, x.shape[0], dtype, x.device) for name, v in self.conditions.items()},
        )

        def call(x_in: Tensor, timestep: Tensor) -> Tensor:
            return self.network(x_in, timestep=timestep, return_dict=False, **kwargs)[0]

        out = batched_network_call(call, x_scaled, self.num_outputs, float(self.timestep(t)), dtype, self.prediction)
        return to_denoised(
            out, self.prediction, x_scaled[None], alpha * c_in, sigma * c_in, float(p.d_alpha(t)), float(p.d_sigma(t))
        )


@dataclass
class WithSharedInputs:
    """``network(x, timestep=..., **conditions, **shared)``: a network with keyword inputs every row
    shares (FLUX.1's 2-D text and image position ids), so :class:`DiffusersDenoiser` repeats only the
    per-row conditions over the batch."""

    network: Any
    shared: dict[str, Any]

    def __call__(self, x: Tensor, timestep: Tensor, return_dict: bool = False, **conditions: Any) -> Any:
        return self.network(x, timestep=timestep, return_dict=return_dict, **conditions, **self.shared)


def check_unet_stack(unets: Any, prediction_types: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the model where a stack of ``UNet2DModel`` s cannot be composed: one
    sample space, outputs that predict the sample, one output type each (``prediction_types``)."""
    if not isinstance(unets, list) or not all(hasattr(u, "config") for u in unets):
        raise ValueError(f"unets={unets!r} is not valid: pass a list of diffusers UNet2DModel")
    if len(prediction_types) != len(unets):
        raise ValueError(f"prediction_types={prediction_types!r} is not valid: pass one per model ({len(unets)})")
    for i, p in enumerate(prediction_types):
        if p not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_types[{i}]={p!r} is not valid: use 'epsilon', 'v_prediction' or 'sample'")
    if not unets:
        return
    ref = unets[0].config
    for i, unet in enumerate(unets):
        c = unet.config
        mine = (c.in_channels, c.sample_size)
        theirs = (ref.in_channels, ref.sample_size)
        if mine != theirs:
            raise ValueError(
                f"unets[{i}] samples (channels, size) = {mine} but unets[0] samples {theirs}: models composed by "
                "superposition must share one sample space; compose models trained on the same data shape"
            )
        if c.out_channels not in (c.in_channels, 2 * c.in_channels):
            raise ValueError(
                f"unets[{i}] has out_channels={c.out_channels} for in_channels={c.in_channels}: its output is not "
                f"an ε / v / x̂₀ prediction of the sample (expected {c.in_channels} channels, or "
                f"{2 * c.in_channels} with a learned variance); compose UNet2DModels trained to denoise their "
                "input"
            )


# ------------------------------------------------------------------------------------------------
# Schedulers → processes and time grids
# ------------------------------------------------------------------------------------------------


def _is_flow(scheduler: Any) -> bool:
    return "FlowMatch" in type(scheduler).__name__ or not hasattr(scheduler, "alphas_cumprod")


def _is_sigma_form(scheduler: Any) -> bool:
    """σ-form schedulers (Euler, Heun, LMS, KDPM2, ...) scale inputs: their ``init_noise_sigma`` exceeds 1."""
    return float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0 + 1e-6


def process_of_scheduler(scheduler: Any) -> Process:
    """The core process a diffusers scheduler's network was trained under (see the module docstring)."""
    if _is_flow(scheduler):
        return RectifiedFlow()
    return (
        DiscreteSigma.from_scheduler(scheduler) if _is_sigma_form(scheduler) else DiscreteVP.from_scheduler(scheduler)
    )


def prediction_of_scheduler(scheduler: Any) -> str:
    """The network's output type in :data:`superdiff.processes.PREDICTIONS` terms."""
    if _is_flow(scheduler):
        return "flow"
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(
            f"unsupported scheduler prediction_type {prediction!r}; use 'epsilon', 'v_prediction' or 'sample'"
        )
    return prediction


@dataclass(frozen=True)
class Schedule:
    """A sampling plan from a scheduler: the process, ``times`` (steps+1,) float64 from noise to data
    (the network is called at ``times[:-1]``; the last step lands on σ = 0), the network timestep
    of a process time, whether inputs are VP-scaled, and the prior std (``init_noise_sigma``)."""

    process: Process
    times: Tensor
    timestep: Callable[[Tensor], Tensor]
    scale_input: bool
    init_noise_sigma: float
    prediction: str


def steps_problem(scheduler: Any, num_inference_steps: int) -> str | None:
    """Whether a discrete-time scheduler's grid of ``num_inference_steps`` is finer than the
    ``num_train_timesteps`` its network was trained at: such a grid repeats timesteps (which the
    sampler cannot step between) or falls between them (DDIM and DDPM refuse it in ``set_timesteps``).
    Flow-matching schedulers take any number of steps (σ is continuous)."""
    n_train = scheduler.config.get("num_train_timesteps") if hasattr(scheduler, "config") else None
    if _is_flow(scheduler) or not isinstance(n_train, int) or num_inference_steps <= n_train:
        return None
    return (f"num_inference_steps={num_inference_steps!r} is not valid: the network was trained at {n_train} "
            f"timesteps ({type(scheduler).__name__}.config.num_train_timesteps), and a finer grid repeats them; use "
            f"{n_train} or fewer")


def schedule_from_scheduler(scheduler: Any, num_inference_steps: int, **set_timesteps_kwargs: Any) -> Schedule:
    """Call ``scheduler.set_timesteps`` and map its grid onto the scheduler's core process.

    * σ-form and VP schedulers: network timestep k ↦ ``t = k/(N_train − 1)`` (the tables of
      :class:`DiscreteSigma`/:class:`DiscreteVP`), so fractional timesteps (``linspace`` spacing,
      Karras σ) map exactly; a final time ``t = 0`` closes the grid and the sampler's
      ``final_denoise`` lands the last step on σ = 0, as diffusers' Euler/DDPM/DDIM steps do.
    * flow matching: ``t = σ`` (after any shift), network timestep ``σ · N_train``; the grid
      starts at σ = 1 (α = 0), where the core's kernels stay finite.
    """
    scheduler.set_timesteps(num_inference_steps, device="cpu", **set_timesteps_kwargs)
    init = float(getattr(scheduler, "init_noise_sigma", 1.0))  # flow matching: x₁ = ε, std 1
    prediction = prediction_of_scheduler(scheduler)
    if _is_flow(scheduler):
        sigmas = torch.as_tensor(scheduler.sigmas, dtype=torch.float64).flatten()
        if float(sigmas[-1]) != 0.0:
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        n_train = float(scheduler.config.num_train_timesteps)
        return Schedule(RectifiedFlow(), sigmas, lambda t: t * n_train, False, init, prediction)
    process = process_of_scheduler(scheduler)
    n = int(torch.as_tensor(scheduler.alphas_cumprod).numel())
    timesteps = torch.as_tensor(scheduler.timesteps, dtype=torch.float64).flatten()
    times = torch.cat([timesteps / (n - 1), timesteps.new_zeros(1)])
    return Schedule(process, times, process.timestep, isinstance(process, DiscreteSigma), init, prediction)


def check_one_process(schedulers: Sequence[Any]) -> None:
    """Refuse schedulers of models trained under different noise schedules: they define different
    processes, and superposition needs one."""
    first = process_of_scheduler(schedulers[0])
    for i, s in enumerate(schedulers[1:], start=1):
        if process_of_scheduler(s) != first:
            raise ValueError(
                f"model {i}'s scheduler ({type(s).__name__}, {s.config.get('beta_schedule')}) defines a different "
                f"noise process than model 0's ({type(schedulers[0]).__name__}, "
                f"{schedulers[0].config.get('beta_schedule')}): superposition needs one process (same "
                "alphas_cumprod); compose models trained with the same schedule"
            )
