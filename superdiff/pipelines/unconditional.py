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

import json
import os
from typing import Any, Callable, Sequence

import torch
from diffusers import UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from tqdm.auto import tqdm

from ..combine import Combiner
from ..models import stack_denoisers
from ..options import SamplerOptions
from ._common import (
    SamplingOptions,
    SuperDiffMixin,
    _fail,
    check_latents,
    check_options,
    check_rows,
    decode,
    model_expression,
    resolve_combiner,
)
from .denoisers import DiffusersDenoiser, process_of_scheduler, schedule_from_scheduler
from .loading import check_safetensors_files, diffusers_dtype, pop_dtype, scheduler_class
from .output import SuperDiffPipelineOutput

__all__ = ["SuperDiffUnconditionalPipeline"]

_INDEX = "superdiff_unconditional.json"


#: ``from_pretrained`` options a scheduler folder honours (it has a config, no weights).
SCHEDULER_KWARGS = ("local_files_only", "cache_dir", "revision", "token", "force_download", "proxies")


def _load_scheduler(folder: str, kwargs: dict[str, Any]) -> Any:
    """The scheduler of ``folder``: a diffusers scheduler class only (:func:`~.loading.scheduler_class`;
    a pipeline named there would load weights without the loading options), with the file options."""
    return scheduler_class(folder).from_pretrained(folder, **{k: kwargs[k] for k in SCHEDULER_KWARGS if k in kwargs})


class SuperDiffUnconditionalPipeline(SuperDiffMixin):
    """OR / AND / average / sum of separately trained ``UNet2DModel`` s under one scheduler.

    ``prediction_types``: each model's output type (default: the scheduler's ``prediction_type``
    for all), so an ε-model and a v-model trained on the same schedule compose.
    """

    def __init__(
        self, unets: Sequence[UNet2DModel], scheduler: Any, prediction_types: Sequence[str] | None = None
    ) -> None:
        self.unets = list(unets)
        self.scheduler = scheduler
        default = scheduler.config.get("prediction_type", "epsilon")
        self.prediction_types = list(prediction_types) if prediction_types is not None else [default] * len(self.unets)
        self._progress_bar_config: dict = {}
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)
        self.check_models()

    # -------------------------------------------------------------------------------------------
    # Composability
    # -------------------------------------------------------------------------------------------

    def check_models(self) -> None:
        """Raise ``ValueError`` if the models cannot be composed (shapes, schedules, output types)."""
        if not isinstance(self.unets, list) or not all(hasattr(u, "config") for u in self.unets):
            _fail("unets", self.unets, "pass a list of diffusers UNet2DModel")
        if len(self.prediction_types) != len(self.unets):
            _fail("prediction_types", self.prediction_types, f"pass one per model ({len(self.unets)})")
        for i, p in enumerate(self.prediction_types):
            if p not in ("epsilon", "v_prediction", "sample"):
                _fail(f"prediction_types[{i}]", p, "use 'epsilon', 'v_prediction' or 'sample'")
        if not self.unets:
            return
        ref = self.unets[0].config
        for i, unet in enumerate(self.unets):
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

    @staticmethod
    def check_schedulers(schedulers: Sequence[Any]) -> None:
        """Models trained under different noise schedules have different processes: refuse them."""
        first = process_of_scheduler(schedulers[0])
        for i, s in enumerate(schedulers[1:], start=1):
            if process_of_scheduler(s) != first:
                raise ValueError(
                    f"model {i}'s scheduler ({type(s).__name__}, {s.config.get('beta_schedule')}) defines a different "
                    f"noise process than model 0's ({type(schedulers[0]).__name__}, "
                    f"{schedulers[0].config.get('beta_schedule')}): superposition needs one process (same "
                    "alphas_cumprod); compose models trained with the same schedule"
                )

    # -------------------------------------------------------------------------------------------
    # Loading, saving, devices
    # -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        scheduler: Any = None,
        dtype: torch.dtype | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> "SuperDiffUnconditionalPipeline":
        """Load from a folder written by :meth:`save_pretrained`, or from a list of diffusers
        ``DDPMPipeline``/``DDIMPipeline`` folders (``unet/`` + ``scheduler/``) or bare ``UNet2DModel``
        folders (then pass ``scheduler``). ``dtype`` casts the weights (``torch_dtype``: its deprecated
        name, with diffusers' ``FutureWarning``; not both). ``local_files_only`` and other kwargs go to
        diffusers."""
        cast = diffusers_dtype(pop_dtype({"dtype": dtype, "torch_dtype": torch_dtype}))
        if isinstance(paths, (str, os.PathLike)):
            root = os.fspath(paths)
            with open(os.path.join(root, _INDEX)) as f:
                index = json.load(f)
            scheduler_loaded = _load_scheduler(os.path.join(root, "scheduler"), kwargs)
            check_safetensors_files(root)
            unets = [
                UNet2DModel.from_pretrained(os.path.join(root, name), **cast, **kwargs) for name in index["unets"]
            ]
            return cls(unets, scheduler_loaded, index.get("prediction_types"))
        unets, schedulers = [], []
        for p in map(os.fspath, paths):
            check_safetensors_files(p)
            if os.path.isdir(os.path.join(p, "unet")):
                schedulers.append(_load_scheduler(os.path.join(p, "scheduler"), kwargs))
                unets.append(UNet2DModel.from_pretrained(p, subfolder="unet", **cast, **kwargs))
            else:
                unets.append(UNet2DModel.from_pretrained(p, **cast, **kwargs))
        if scheduler is None and not schedulers:
            _fail("scheduler", None, "pass a scheduler when loading bare UNet2DModel folders")
        if schedulers:
            cls.check_schedulers(schedulers + ([scheduler] if scheduler is not None else []))
        chosen = scheduler if scheduler is not None else schedulers[0]
        predictions = (
            [s.config.get("prediction_type", "epsilon") for s in schedulers] if len(schedulers) == len(unets) else None
        )
        return cls(unets, chosen, predictions)

    @classmethod
    def from_pipe(cls, pipes: Sequence[Any], **kwargs: Any) -> "SuperDiffUnconditionalPipeline":
        """Share the UNets of already loaded ``DDPMPipeline``/``DDIMPipeline`` s (no copies)."""
        schedulers = [p.scheduler for p in pipes]
        cls.check_schedulers(schedulers)
        predictions = [s.config.get("prediction_type", "epsilon") for s in schedulers]
        return cls([p.unet for p in pipes], kwargs.pop("scheduler", schedulers[0]), predictions)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        root = os.fspath(save_directory)
        os.makedirs(root, exist_ok=True)
        names = [f"unet_{i}" for i in range(len(self.unets))]
        for name, unet in zip(names, self.unets):
            unet.save_pretrained(os.path.join(root, name), **kwargs)
        self.scheduler.save_pretrained(os.path.join(root, "scheduler"))
        with open(os.path.join(root, _INDEX), "w") as f:
            json.dump({"unets": names, "prediction_types": self.prediction_types}, f, indent=2)

    def to(self, *args: Any, **kwargs: Any) -> "SuperDiffUnconditionalPipeline":
        for unet in self.unets:
            unet.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.unets[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.unets[0].dtype

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for the sampling bar (``desc``, ``disable``, ``file``, ...), as in diffusers."""
        self._progress_bar_config = kwargs

    def progress_bar(self, total: int) -> tqdm:
        """A tqdm bar of ``total`` steps with the options of :meth:`set_progress_bar_config` (diffusers' rule)."""
        return tqdm(total=total, **self._progress_bar_config)

    # -------------------------------------------------------------------------------------------
    # Sampling
    # -------------------------------------------------------------------------------------------

    def check_inputs(self, options: SamplingOptions, batch_argument: str = "batch_size") -> None:
        """Raise ``ValueError`` (naming the argument, the value and what works) before any network call:
        the models' compatibility and the options (the combiner checked itself). ``batch_argument``
        names the batch size as the caller passed it (``batch_size`` or ``num_images_per_prompt``)."""
        self.check_models()
        check_options(options, batch_argument, self.scheduler)

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
        **sampler_options: Any,
    ) -> SuperDiffPipelineOutput | tuple:
        """Sample ``batch_size`` images from the composition of the models (see
        :meth:`SuperDiffPipeline.__call__ <superdiff.pipelines.SuperDiffPipeline.__call__>` for the
        modes and ``combiner=``; here ``mode`` defaults to ``"or"``). Images are read as pixels in [−1, 1].

        The text pipelines' call signature: ``num_images_per_prompt`` is another name for
        ``batch_size`` (default 1; pass one, or equal values); ``latents`` (B, C, H, W) is the
        starting noise, scaled by the scheduler's ``init_noise_sigma`` as in diffusers. An
        unconditional stack has no prompts and no classifier-free guidance: ``prompts``,
        ``prompt``, ``negative_prompt`` and ``guidance_scale`` are refused with a ``ValueError``.
        """
        # 1. Check inputs: no text arguments, the one combiner of the call, then the options
        for name, value in (("prompts", prompts), ("prompt", prompt), ("negative_prompt", negative_prompt),
                            ("guidance_scale", guidance_scale)):
            if value is not None:
                _fail(
                    name,
                    value,
                    "an unconditional stack has no prompts and no classifier-free guidance: it composes its unets "
                    "with mode=...; leave it out (num_images_per_prompt / batch_size set the number of images)",
                )
        batch_argument = (
            "num_images_per_prompt" if batch_size is None and num_images_per_prompt is not None else "batch_size"
        )
        batch_size = self._batch_size(batch_size, num_images_per_prompt)
        if expression is not None:  # leaves are the unets' indices: "0 | 1", or Leaf(0), Leaf(1)
            combiner = model_expression(expression, len(self.unets), combiner, mode, temperature, log_weights)
        options = SamplingOptions(
            combiner=resolve_combiner(
                combiner, mode, temperature, log_weights, len(self.unets), "unets", default_mode="or"
            ),
            sampler=SamplerOptions.from_kwargs(**sampler_options),
            num_inference_steps=num_inference_steps,
            guidance_scale=None,
            num_images_per_prompt=batch_size,
            generator=generator,
            latents=latents,
            output_type=output_type,
            return_dict=return_dict,
            progress=progress,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self.check_inputs(options, batch_argument)
        check_rows(options, len(self.unets), batch_argument)

        # 2. Define call parameters: the shape of the samples
        c = self.unets[0].config
        size = tuple(c.sample_size) if isinstance(c.sample_size, (list, tuple)) else (c.sample_size, c.sample_size)
        shape = (batch_size, c.in_channels, *size)
        check_latents(latents, shape, "(batch_size, unet in_channels, sample_size, sample_size)")

        # 3. Prepare timesteps (no prompts to encode)
        schedule = schedule_from_scheduler(self.scheduler, num_inference_steps)

        # 4. Prepare the denoiser: the models stacked, one forward per model and step
        denoiser = stack_denoisers(
            [
                DiffusersDenoiser(
                    unet, schedule.process, prediction, schedule.timestep, scale_input=schedule.scale_input
                )
                for unet, prediction in zip(self.unets, self.prediction_types)
            ]
        )

        # 5. Denoising loop (the samples are drawn, or taken from latents=, inside)
        result = self._superdiff_sample(denoiser, schedule, shape, options, self.device, self.dtype)

        # 6. Decode: the samples are pixels in [-1, 1]
        images = decode(None, result.samples, self.image_processor, output_type)
        return self._superdiff_output(images, result, schedule, options)

    @staticmethod
    def _batch_size(batch_size: Any, num_images_per_prompt: Any) -> Any:
        """``batch_size``, or the text pipelines' name for it, ``num_images_per_prompt`` (default 1)."""
        if batch_size is None:
            return 1 if num_images_per_prompt is None else num_images_per_prompt
        if num_images_per_prompt is not None and num_images_per_prompt != batch_size:
            _fail("num_images_per_prompt", num_images_per_prompt, f"it is another name for batch_size, given as "
                  f"{batch_size!r}; pass one of them")
        return batch_size
