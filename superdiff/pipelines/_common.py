"""Plumbing shared by the superdiff pipelines: input checks, the sampling call and postprocessing."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

import torch
from diffusers import DiffusionPipeline

from ..combine import MODES, make_combiner
from ..sampling import SamplerOutput, StepInfo, randn, sample_sde
from .denoisers import Schedule
from .output import SuperDiffPipelineOutput

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
#: What ``callback_on_step_end`` can ask for (``callback_on_step_end_tensor_inputs``): the state after
#: the step, the mixed x̂₀ that drove it, κ (B, M) and the log-densities (B, M).
CALLBACK_TENSOR_INPUTS = ("latents", "denoised", "kappa", "log_densities")


def _fail(argument: str, given: Any, works: str) -> None:
    raise ValueError(f"{argument}={given!r} is not valid: {works}")


def prompts_argument(prompts: Any, prompt: Any) -> Any:
    """``prompts``, or diffusers' name for them, ``prompt`` (a string becomes a one-prompt list)."""
    if prompt is None:
        return prompts
    if prompts is not None:
        _fail("prompt", prompt, "pass the prompts once, as prompts=[...] or as diffusers' prompt=[...]")
    return [prompt] if isinstance(prompt, str) else prompt


def check_prompts(prompts: Any, mode: str, argument: str = "prompts") -> int:
    """Validate the list of prompts for ``mode``; returns M."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        _fail(argument, prompts, 'pass a list of prompt strings, e.g. ["a flamingo", "a candy cane"]')
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            _fail(f"{argument}[{i}]", p, "every prompt must be a non-empty string")
    return len(prompts)


def check_common(
    *,
    num_models: int,
    what: str,
    mode: Any,
    guidance_scale: Any,
    num_inference_steps: Any,
    temperature: Any,
    log_weights: Any,
    num_images_per_prompt: Any,
    output_type: Any,
    generator: Any,
    callback_on_step_end: Any,
    height: Any = None,
    width: Any = None,
    multiple: int = 1,
    negative_prompt: Any = None,
    callback_on_step_end_tensor_inputs: Any = ("latents",),
) -> None:
    """The checks every pipeline shares; ``what`` names the composed things ("prompts", "unets")."""
    if mode not in MODES:
        _fail("mode", mode, f"use one of {MODES}")
    if mode in ("and", "or") and num_models < 2:
        _fail(what, f"{num_models} item(s)", f"mode={mode!r} composes at least 2 {what}; pass 2 or more, or use mode='average'")
    if num_models < 1:
        _fail(what, "[]", f"pass at least one of the {what} to compose")
    if guidance_scale is not None and (
        not isinstance(guidance_scale, numbers.Real) or not math.isfinite(guidance_scale) or guidance_scale < 0
    ):
        _fail("guidance_scale", guidance_scale, "use a finite number >= 0 (e.g. 7.5; 1.0 means no extra guidance)")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral) or num_inference_steps < 1:
        _fail("num_inference_steps", num_inference_steps, "use a positive integer, e.g. 50")
    if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature <= 0:
        _fail("temperature", temperature, "use a finite number > 0 (1.0 samples the exact mixture for mode='or')")
    if log_weights is not None:
        if mode not in ("and", "or"):
            _fail("log_weights", log_weights, f"log_weights apply to mode 'or' (bias) and 'and' (offsets), not {mode!r}; pass None")
        try:
            values = [float(v) for v in log_weights]
        except (TypeError, ValueError):
            values = None
        if values is None or len(values) != num_models:
            _fail("log_weights", log_weights, f"pass {num_models} numbers, one per entry of {what}")
        if not all(math.isfinite(v) for v in values):
            _fail("log_weights", log_weights, "all entries must be finite")
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, numbers.Integral) or num_images_per_prompt < 1:
        _fail("num_images_per_prompt", num_images_per_prompt, "use a positive integer")
    if output_type not in OUTPUT_TYPES:
        _fail("output_type", output_type, f"use one of {OUTPUT_TYPES}")
    if isinstance(generator, (list, tuple)):
        if len(generator) != num_images_per_prompt or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(
                f"generator=<a list of {len(generator)} items> is not valid: a list needs one torch.Generator per image "
                f"({num_images_per_prompt}); pass that many, or one generator for the whole batch"
            )
    elif generator is not None and not isinstance(generator, torch.Generator):
        _fail("generator", generator, "pass a torch.Generator (it drives the whole batch), one per image, or None")
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        _fail("callback_on_step_end", callback_on_step_end, "pass a callable (pipe, step, timestep, callback_kwargs) or None")
    names = callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or any(n not in CALLBACK_TENSOR_INPUTS for n in names):
        _fail("callback_on_step_end_tensor_inputs", names, f"pass a list of names from {list(CALLBACK_TENSOR_INPUTS)}")
    one_in_a_list = isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) == 1 and isinstance(negative_prompt[0], str)
    if negative_prompt is not None and not isinstance(negative_prompt, str) and not one_in_a_list:
        _fail("negative_prompt", negative_prompt, "pass one string or a one-element list of it (the composed prompts share "
              "one unconditional branch, so one negative prompt), or None")
    if negative_prompt is not None and guidance_scale is None:
        _fail("negative_prompt", negative_prompt, "it is the unconditional branch of guidance, which guidance_scale=None "
              "turns off; pass a guidance_scale (e.g. 7.5) or no negative_prompt")
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0 or value % multiple:
            below = max(multiple, (int(value) // multiple) * multiple) if isinstance(value, numbers.Real) else multiple
            _fail(name, value, f"must be a positive multiple of {multiple} (image pixels per latent pixel or transformer "
                  f"patch); e.g. {below}")


def check_latents(latents: Any, shape: tuple[int, ...], layout: str) -> None:
    """A user's starting noise (diffusers' ``latents=``): None, or a finite floating tensor of exactly
    the sampled ``shape`` (``layout`` names its dims for the message)."""
    if latents is None:
        return
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        given = f"<a {latents.dtype} tensor>" if isinstance(latents, torch.Tensor) else f"<a {type(latents).__name__}>"
        raise ValueError(f"latents={given} is not valid: pass a floating torch.Tensor of shape {tuple(shape)} {layout}, "
                         "or None to draw the noise")
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(
            f"latents=<a tensor of shape {tuple(latents.shape)}> is not valid: this call samples shape {tuple(shape)} "
            f"{layout}; pass latents of that shape, or change the batch size / height / width to match them"
        )
    if not bool(torch.isfinite(latents).all()):
        _fail("latents", "<a tensor with NaN or inf>", "every entry must be finite")


def refuse_embeddings(**given: Any) -> None:
    """diffusers' precomputed-embedding arguments (``prompt_embeds=`` & co), refused by name: superdiff
    encodes the composed prompts and the unconditional one itself, in one text-encoder call."""
    for name, value in given.items():
        if value is not None:
            _fail(name, f"<{type(value).__name__}>", "superdiff pipelines do not take precomputed text embeddings; pass "
                  "the texts as prompts=[...] (and negative_prompt=...), which are encoded once per call")


def negative_text(negative_prompt: str | Sequence[str] | None) -> str | None:
    """The one negative prompt of a checked ``negative_prompt`` (a string or a one-element list)."""
    return negative_prompt if negative_prompt is None or isinstance(negative_prompt, str) else negative_prompt[0]


def callback_tensor_names(callback_on_step_end: Any, names: Any) -> Any:
    """The tensors a step callback receives: ``names``, or the ``tensor_inputs`` of a diffusers
    ``PipelineCallback`` / ``MultiPipelineCallbacks`` (diffusers' rule)."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
        return callback_on_step_end.tensor_inputs
    return names


def latents_from_callback(returned: Any) -> torch.Tensor | None:
    """The new state a diffusers-style step callback asks for: its returned dict's ``"latents"``
    (None: keep the state; the callback may also return None)."""
    if returned is None:
        return None
    if not isinstance(returned, dict):
        raise ValueError(
            f"callback_on_step_end returned a {type(returned).__name__}; return the callback_kwargs dict (its "
            "'latents', if changed, replace the state, as in diffusers) or None"
        )
    return returned.get("latents")


def step_callback(
    pipe: Any, schedule: Schedule, callback_on_step_end: Callable | None, tensor_inputs: Sequence[str]
) -> Callable[[StepInfo], torch.Tensor | None] | None:
    """The sampler callback that calls a diffusers-style ``callback_on_step_end(pipe, step, timestep,
    callback_kwargs)`` with the tensors named in ``tensor_inputs`` and returns its new ``"latents"``."""
    if callback_on_step_end is None:
        return None
    names = list(callback_tensor_names(callback_on_step_end, tensor_inputs))
    times = schedule.times

    def callback(info: StepInfo) -> torch.Tensor | None:
        timestep = schedule.timestep(times[info.step])
        tensors = {"latents": info.x, "denoised": info.denoised, "kappa": info.kappa, "log_densities": info.log_q}
        return latents_from_callback(callback_on_step_end(pipe, info.step, timestep, {n: tensors[n] for n in names}))

    return callback


def guided_conditions(
    conditions: dict[str, Any], num_prompts: int, guidance_scale: float | None
) -> tuple[dict[str, Any], float | None]:
    """The network conditions and guidance scale of a call: with guidance, the prompts' rows and
    the unconditional one; unguided (``None``), the M prompt-conditional models alone."""
    if guidance_scale is None:
        return prompt_rows(conditions, num_prompts), None
    return conditions, float(guidance_scale)


def prompt_rows(conditions: dict[str, Any], num_prompts: int) -> dict[str, Any]:
    """The conditions of the prompts alone (their first ``num_prompts`` rows, nested dicts too),
    dropping the unconditional row: unguided sampling never evaluates it."""
    return {
        name: prompt_rows(value, num_prompts) if isinstance(value, dict) else value[:num_prompts]
        for name, value in conditions.items()
    }


class SuperDiffMixin:
    """Sampling and postprocessing for a :class:`~diffusers.DiffusionPipeline` subclass."""

    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)

    @property
    def guidance_scale(self) -> float | None:
        """The guidance scale of the current (or last) call; None: unguided."""
        return getattr(self, "_guidance_scale", None)

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (e.g. from ``callback_on_step_end``) to stop after the current
        step; the call then returns the current, still noisy, latents decoded, as in diffusers."""
        return getattr(self, "_interrupt", False)

    @property
    def num_timesteps(self) -> int | None:
        """The number of sampling steps (network calls) of the current (or last) call."""
        return getattr(self, "_num_timesteps", None)

    def _superdiff_sample(
        self: DiffusionPipeline,
        denoiser: Any,
        schedule: Schedule,
        shape: tuple[int, ...],
        *,
        mode: str,
        num_models: int,
        temperature: float,
        log_weights: Sequence[float] | None,
        guidance_scale: float | None,
        generator: torch.Generator | list[torch.Generator] | None,
        callback_on_step_end: Callable | None,
        progress: bool,
        device: torch.device,
        network_dtype: torch.dtype = torch.float32,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        latents: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """Start at ``init_noise_sigma · z`` and run the reverse SDE on the schedule; ``z`` is drawn
        from ``generator`` or is the caller's ``latents`` (checked by :func:`check_latents`),
        scaled by ``init_noise_sigma`` as diffusers' ``prepare_latents`` scales them.

        The state is float32 (float64 when the network is float64, as in exactness tests) whatever
        the network's half precision; one ``generator`` drives the start (unless ``latents`` are
        given) and every step's noise.
        """
        dtype = torch.float64 if network_dtype == torch.float64 else torch.float32
        combiner = make_combiner(mode, num_models, temperature, None if log_weights is None else list(log_weights))
        z = randn(shape, generator, device, dtype) if latents is None else latents.to(device=device, dtype=dtype)
        x = schedule.init_noise_sigma * z
        times = schedule.times
        self._guidance_scale = guidance_scale
        self._num_timesteps = len(times) - 1
        self._interrupt = False
        on_step = step_callback(self, schedule, callback_on_step_end, callback_on_step_end_tensor_inputs)
        # The pipeline's own bar (diffusers' progress_bar: set_progress_bar_config applies), advanced per step.
        bar = self.progress_bar(total=self._num_timesteps) if progress else None

        def callback(info: StepInfo) -> torch.Tensor | None:
            if bar is not None:
                bar.update()
            return None if on_step is None else on_step(info)

        try:
            return sample_sde(
                denoiser,
                x,
                times,
                combiner,
                guidance_scale=guidance_scale,
                generator=generator,
                callback=callback if bar is not None or on_step is not None else None,
                final_denoise=True,
                interrupt=lambda: self.interrupt,
            )
        finally:
            if bar is not None:
                bar.close()

    def _superdiff_output(
        self, images: Any, result: SamplerOutput, schedule: Schedule, return_dict: bool
    ) -> SuperDiffPipelineOutput | tuple:
        timesteps = schedule.timestep(result.times[:-1])  # fewer than planned after an interrupt
        out = SuperDiffPipelineOutput(
            images=images,
            log_densities=result.log_densities,
            log_density_trace=result.log_density_trace,
            kappa_trace=result.kappa_trace,
            timesteps=timesteps,
        )
        return out if return_dict else out.to_tuple()


def decode(vae: Any, latents: torch.Tensor, image_processor: Any, output_type: str, shift: float = 0.0) -> Any:
    """Latents → images: ``vae.decode(latents / scaling_factor + shift)`` (``vae=None``: the latents
    are pixels in [−1, 1]), then diffusers' image postprocessing."""
    if output_type == "latent":
        return latents
    if vae is not None:
        dtype = vae.dtype
        upcast = dtype == torch.float16 and bool(vae.config.get("force_upcast", False))
        if upcast:
            vae.to(torch.float32)
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is not None and std is not None:  # per-channel latent statistics (some SDXL-type VAEs)
            view = (1, -1) + (1,) * (latents.dim() - 2)
            mean = torch.tensor(mean, device=latents.device).view(view)
            std = torch.tensor(std, device=latents.device).view(view)
            z = latents * std / vae.config.scaling_factor + mean
        else:
            z = latents / vae.config.scaling_factor + shift
        images = vae.decode(z.to(vae.dtype), return_dict=False)[0].float()
        if upcast:
            vae.to(dtype)
    else:
        images = latents.float()
    return image_processor.postprocess(images.detach().cpu(), output_type=output_type)
