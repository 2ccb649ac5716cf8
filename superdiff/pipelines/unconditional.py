"""Compose separately trained unconditional diffusers models (the paper's CIFAR-10 experiment): a list of
:class:`~diffusers.UNet2DModel` under one DDPM/DDIM-type (or σ-form) scheduler, OR / AND / average / sum, one
forward per model and step. Loading, saving and ``.to`` follow diffusers (:class:`~.loading.UnconditionalStackIO`)
without a ``DiffusionPipeline``, whose components are a fixed set of named modules rather than a list.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from diffusers import UNet2DModel
from diffusers.image_processor import VaeImageProcessor

from ..models import stack_denoisers
from ..options import SamplerOptions
from ._common import (
    SamplingOptions,
    batch_size_argument,
    check_options,
    model_expression,
    refuse_text_arguments,
    resolve_combiner,
)
from .base import PipelineCall, SuperDiffLoop
from .denoisers import DiffusersDenoiser, Schedule, check_unet_stack
from .loading import UnconditionalStackIO
from .output import SuperDiffPipelineOutput

__all__ = ["SuperDiffUnconditionalPipeline"]


class SuperDiffUnconditionalPipeline(UnconditionalStackIO, SuperDiffLoop):
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

    @property
    def network(self) -> UNet2DModel:
        return self.unets[0]

    #: The generated ``__call__`` (:func:`~.base._family_call`): ``batch_size`` first, no image size or
    #: prompt embeddings; ``prompts``, ``prompt``, ``negative_prompt`` and ``guidance_scale`` stay, to be refused.
    call_leading = (inspect.Parameter("batch_size", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                      annotation="int | None"),)
    call_without = ("height", "width", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                    "negative_pooled_prompt_embeds")
    call_defaults = {"guidance_scale": None, "num_images_per_prompt": None}
    call_doc = """Sample ``batch_size`` images from the composition of the models (see
        :meth:`SuperDiffPipeline.__call__ <superdiff.pipelines.SuperDiffPipeline.__call__>` for the
        modes, ``combiner=``, the sampling options and ``options=``; here ``mode`` defaults to ``"or"``,
        and an ``expression``'s leaves are the models' indices, ``"0 | 1"``). Images are pixels in [−1, 1].

        ``num_images_per_prompt`` is another name for ``batch_size`` (default 1; pass one, or equal
        values); ``latents`` (B, C, H, W) is the starting noise, scaled by the scheduler's
        ``init_noise_sigma`` as in diffusers. An unconditional stack has no prompts and no
        classifier-free guidance: ``prompts``, ``prompt``, ``negative_prompt`` and ``guidance_scale``
        are refused with a ``ValueError``."""

    @classmethod
    def guides(cls, guidance_scale: Any, true_cfg_scale: Any, *, negative_prompt: Any = None,
               config: Any = None) -> bool:
        """Never: an unconditional stack has no classifier-free guidance (its rows are the models alone)."""
        return False

    def _compose(self, batch_size: Any, mode: Any, temperature: Any, log_weights: Any, combiner: Any,
                 expression: Any, num_images_per_prompt: Any, options: Any, sampler_options: dict[str, Any],
                 **arguments: Any) -> SuperDiffPipelineOutput | tuple:
        """The resolved call: the refused text arguments, the batch size, the combiner, then :meth:`_run`."""
        refuse_text_arguments(**{name: arguments.pop(name) for name in (
            "prompts", "prompt", "negative_prompt", "guidance_scale")})
        batch_size, batch_argument = batch_size_argument(batch_size, num_images_per_prompt)
        if expression is not None:  # leaves are the unets' indices: "0 | 1", or Leaf(0), Leaf(1)
            combiner = model_expression(expression, len(self.unets), combiner, mode, temperature, log_weights)
        combiner = resolve_combiner(combiner, mode, temperature, log_weights, len(self.unets), "unets",
                                    default_mode="or")
        sampling = SamplingOptions(combiner=combiner, num_images_per_prompt=batch_size, **arguments,
                                   sampler=SamplerOptions.from_kwargs(options, **sampler_options))
        return self._run(PipelineCall(sampling, batch_argument=batch_argument))

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
