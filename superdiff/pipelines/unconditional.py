"""Compose separately trained unconditional diffusers models (the paper's CIFAR-10 experiment).

``SuperDiffUnconditionalPipeline`` takes a list of :class:`~diffusers.UNet2DModel` and one
DDPM/DDIM-type scheduler (a VP process, :class:`~superdiff.processes.DiscreteVP`; σ-form
schedulers work too) and samples OR (the mixture of the models), AND (equal densities) or the
average/sum baselines with superdiff's reverse SDE. Each model is a separate network, so one step
costs one forward per model; the models must share their sample shape and noise schedule, which
is checked when the pipeline is built and again before every call.

It follows diffusers' conventions (``from_pretrained``, ``from_pipe``, ``save_pretrained``,
``.to``, ``generator``, ``output_type``) without being a ``DiffusionPipeline``, whose components
are a fixed set of named modules rather than a list.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
from diffusers import UNet2DModel
from diffusers.image_processor import VaeImageProcessor

from ..combine import Combiner
from ..models import stack_denoisers
from ..options import SamplerOptions
from ._common import (
    SamplingOptions,
    _fail,
    check_options,
    model_expression,
    resolve_combiner,
)
from .base import PipelineCall, SuperDiffLoop
from .denoisers import DiffusersDenoiser, Schedule, check_one_process, check_unet_stack
from .loading import load_unconditional, pop_dtype, save_unconditional
from .output import SuperDiffPipelineOutput

__all__ = ["SuperDiffUnconditionalPipeline"]


class SuperDiffUnconditionalPipeline(SuperDiffLoop):
    """OR / AND / average / sum of separately trained ``UNet2DModel`` s under one scheduler.

    ``prediction_types``: each model's output type (default: the scheduler's ``prediction_type``
    for all), so an ε-model and a v-model trained on the same schedule compose.
    """

    latents_layout = "(batch_size, unet in_channels, sample_size, sample_size)"

    def __init__(
        self, unets: Sequence[UNet2DModel], scheduler: Any, prediction_types: Sequence[str] | None = None
    ) -> None:
        self.unets = list(unets)
        self.scheduler = scheduler
        default = scheduler.config.get("prediction_type", "epsilon")
        self.prediction_types = list(prediction_types) if prediction_types is not None else [default] * len(self.unets)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)
        self.check_models()

    def check_models(self) -> None:
        """Raise ``ValueError`` if the models cannot be composed (shapes, output types)."""
        check_unet_stack(self.unets, self.prediction_types)

    #: Models trained under different noise schedules have different processes: refuse them.
    check_schedulers = staticmethod(check_one_process)

    @classmethod
    def from_pretrained(
        cls, paths: str | os.PathLike | Sequence[str | os.PathLike], scheduler: Any = None,
        dtype: torch.dtype | None = None, torch_dtype: torch.dtype | None = None, **kwargs: Any,
    ) -> "SuperDiffUnconditionalPipeline":
        """Load from a folder written by :meth:`save_pretrained`, or from a list of diffusers
        ``DDPMPipeline``/``DDIMPipeline`` folders (``unet/`` + ``scheduler/``) or bare ``UNet2DModel``
        folders (then pass ``scheduler``). ``dtype`` casts the weights (``torch_dtype``: its deprecated
        name, with diffusers' ``FutureWarning``; not both). ``local_files_only`` and other kwargs go to
        diffusers."""
        cast = pop_dtype({"dtype": dtype, "torch_dtype": torch_dtype})
        unets, to_check, chosen, predictions = load_unconditional(paths, scheduler, cast, kwargs)
        if to_check:
            cls.check_schedulers(to_check)
        return cls(unets, chosen, predictions)

    @classmethod
    def from_pipe(cls, pipes: Sequence[Any], **kwargs: Any) -> "SuperDiffUnconditionalPipeline":
        """Share the UNets of already loaded ``DDPMPipeline``/``DDIMPipeline`` s (no copies)."""
        schedulers = [p.scheduler for p in pipes]
        cls.check_schedulers(schedulers)
        predictions = [s.config.get("prediction_type", "epsilon") for s in schedulers]
        return cls([p.unet for p in pipes], kwargs.pop("scheduler", schedulers[0]), predictions)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        save_unconditional(os.fspath(save_directory), self.unets, self.scheduler, self.prediction_types, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> "SuperDiffUnconditionalPipeline":
        for unet in self.unets:
            unet.to(*args, **kwargs)
        return self

    @property
    def network(self) -> UNet2DModel:
        return self.unets[0]

    @property
    def device(self) -> torch.device:
        return self.unets[0].device

    _execution_device = device

    @property
    def dtype(self) -> torch.dtype:
        return self.unets[0].dtype

    # -------------------------------------------------------------------------------------------
    # Sampling
    # -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        mode: str | None = None,
        num_inference_steps: int = 50,
        temperature: float | None = None,
        log_weights: Sequence[float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        progress: bool = True,
        return_dict: bool = True,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        num_images_per_prompt: int | None = None,
        latents: torch.Tensor | None = None,
        prompts: Any = None,
        prompt: Any = None,
        negative_prompt: Any = None,
        guidance_scale: Any = None,
        combiner: Combiner | None = None,
        expression: Any = None,
        options: SamplerOptions | None = None,
        **sampler_options: Any,
    ) -> SuperDiffPipelineOutput | tuple:
        """Sample ``batch_size`` images from the composition of the models (see
        :meth:`SuperDiffPipeline.__call__ <superdiff.pipelines.SuperDiffPipeline.__call__>` for the
        modes, ``combiner=``, the sampling options and ``options=``; here ``mode`` defaults to ``"or"``,
        and an ``expression``'s leaves are the models' indices, ``"0 | 1"``). Images are pixels in [−1, 1].

        ``num_images_per_prompt`` is another name for ``batch_size`` (default 1; pass one, or equal
        values); ``latents`` (B, C, H, W) is the starting noise, scaled by the scheduler's
        ``init_noise_sigma`` as in diffusers. An unconditional stack has no prompts and no
        classifier-free guidance: ``prompts``, ``prompt``, ``negative_prompt`` and ``guidance_scale``
        are refused with a ``ValueError``.
        """
        for name, value in (("prompts", prompts), ("prompt", prompt), ("negative_prompt", negative_prompt),
                            ("guidance_scale", guidance_scale)):
            if value is not None:
                _fail(name, value, "an unconditional stack has no prompts and no classifier-free guidance: it "
                      "composes its unets with mode=...; leave it out (num_images_per_prompt / batch_size set the "
                      "number of images)")
        batch_argument = (
            "num_images_per_prompt" if batch_size is None and num_images_per_prompt is not None else "batch_size"
        )
        batch_size = self._batch_size(batch_size, num_images_per_prompt)
        if expression is not None:  # leaves are the unets' indices: "0 | 1", or Leaf(0), Leaf(1)
            combiner = model_expression(expression, len(self.unets), combiner, mode, temperature, log_weights)
        combiner = resolve_combiner(combiner, mode, temperature, log_weights, len(self.unets), "unets",
                                    default_mode="or")
        sampling = SamplingOptions(
            combiner=combiner, num_inference_steps=num_inference_steps, num_images_per_prompt=batch_size,
            generator=generator, latents=latents, output_type=output_type, return_dict=return_dict,
            progress=progress, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            sampler=SamplerOptions.from_kwargs(options, **sampler_options),
        )
        return self._run(PipelineCall(sampling, batch_argument=batch_argument))

    @staticmethod
    def _batch_size(batch_size: Any, num_images_per_prompt: Any) -> Any:
        """``batch_size``, or the text pipelines' name for it, ``num_images_per_prompt`` (default 1)."""
        if batch_size is None:
            return 1 if num_images_per_prompt is None else num_images_per_prompt
        if num_images_per_prompt is not None and num_images_per_prompt != batch_size:
            _fail("num_images_per_prompt", num_images_per_prompt, f"it is another name for batch_size, given as "
                  f"{batch_size!r}; pass one of them")
        return batch_size

    # ------------------------------------------------------------------------------------------------
    # The loop's hooks
    # ------------------------------------------------------------------------------------------------

    def check_inputs(self, call: PipelineCall) -> None:
        """The models' compatibility and the options (the combiner checked itself)."""
        self.check_models()
        check_options(call.options, call.batch_argument, self.scheduler)

    def num_models(self, call: PipelineCall) -> int:
        return len(self.unets)

    def latents_shape(self, call: PipelineCall) -> tuple[int, ...]:
        c = self.unets[0].config
        size = tuple(c.sample_size) if isinstance(c.sample_size, (list, tuple)) else (c.sample_size, c.sample_size)
        return (call.options.num_images_per_prompt, c.in_channels, *size)

    def denoiser(self, call: PipelineCall, conditions: dict[str, Any], schedule: Schedule) -> Any:
        """The models stacked: one forward per model and step."""
        return stack_denoisers([
            DiffusersDenoiser(unet, schedule.process, prediction, schedule.timestep, scale_input=schedule.scale_input)
            for unet, prediction in zip(self.unets, self.prediction_types)
        ])
