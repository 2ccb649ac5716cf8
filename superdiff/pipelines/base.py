"""The one pipeline loop every superdiff pipeline runs, and the base of the text-to-image families.

:class:`SuperDiffLoop` owns a call's steps (check → encode → prepare latents → sample → decode →
output), the progress bar, the diffusers-style step callback, interruption and the particles'
one-per-image draw. A model family is an adapter of a few hooks: :meth:`~SuperDiffLoop.check_inputs`,
:meth:`~SuperDiffLoop.latents_shape`, :meth:`~SuperDiffLoop.encode` (the prompts into the rows of one
batched network call), :meth:`~SuperDiffLoop.time_grid`, :meth:`~SuperDiffLoop.denoiser` (the network
on those rows, its output converted to x̂₀ by :class:`~.denoisers.DiffusersDenoiser`),
:meth:`~SuperDiffLoop.starting_noise` and :meth:`~SuperDiffLoop.decode`.

:class:`SuperDiffBasePipeline` adds what the text-to-image families share: diffusers'
``from_pretrained`` / ``from_pipe`` / ``save_pretrained``, and one ``__call__`` whose signature each
family derives from the template below with its own defaults (``call_defaults``) and arguments, so
the diffusers-named arguments are spelled once and stay explicit in every family's signature.
:class:`FlowFamily` adds what the flow-matching transformers share (the σ = 1 check, the text length, the
shifted σ grid), :class:`PackedLatents` FLUX.1's packed 2×2 latents and :class:`DistilledGuidance` the guidance
input of a guidance-distilled transformer.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from tqdm.auto import tqdm

from ..combine import Combiner
from ..options import SamplerOptions
from ..particles import select_particles
from ..sampling import SamplerOutput, StepInfo, prior_sample, randn, sample_sde
from ._common import (
    CALLBACK_TENSOR_INPUTS,
    SamplingOptions,
    callback_tensor_names,
    check_flow_inputs,
    check_latents,
    check_options,
    check_rows,
    check_text_inputs,
    decode,
    guided_conditions,
    is_number,
    negative_text,
    prompts_argument,
    refuse_embeddings,
    resolve_composition,
    sampling_schedule,
)
from .denoisers import DiffusersDenoiser, Schedule, schedule_from_scheduler
from .loading import PIPELINE_CLASS_NAMES, check_loading_class, diffusers_dtype, pop_dtype, pop_loading_dtype
from .output import SuperDiffPipelineOutput

__all__ = [
    "DistilledGuidance", "FlowFamily", "PackedLatents", "PipelineCall", "SuperDiffBasePipeline", "SuperDiffLoop",
    "compose", "superdiff_class_of",
]


@dataclass
class PipelineCall:
    """One call's resolved arguments, handed to the family hooks. ``prompts``: the composed
    conditions (none for an unconditional stack); ``height`` / ``width``: as given, then filled in by
    :meth:`SuperDiffLoop.latents_shape`; ``guidance_scale``: as given (FLUX.1's distilled guidance;
    the sampler's classifier-free guidance is ``options.guidance``)."""

    options: SamplingOptions
    prompts: list[str] = field(default_factory=list)
    negative_prompt: Any = None
    height: Any = None
    width: Any = None
    guidance_scale: Any = None
    true_cfg_scale: Any = None
    max_sequence_length: Any = None
    batch_argument: str = "num_images_per_prompt"
    schedule: Any = None  # the time grid, once steps 1–3 (SuperDiffLoop._checked_shape) have run

    @property
    def negative_text(self) -> str | None:
        """The one negative prompt (checked: a string, or a one-element list of it), or None."""
        return negative_text(self.negative_prompt)

    @property
    def texts(self) -> list[str]:
        """The rows' texts: the M prompts, then the unconditional one (the negative prompt, or ``""``)."""
        return [*self.prompts, self.negative_text or ""]


class SuperDiffLoop:
    """The loop of a superdiff pipeline call over the family hooks (see the module docstring), and what
    every call shares: the progress bar, the step callback, interruption, the particles' draw, the output."""

    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)

    #: The family's defaults of the ``__call__`` template's arguments (:meth:`SuperDiffBasePipeline.__call__`),
    #: and the family-only arguments it takes; its ``__call__`` is generated from them (:func:`_family_call`).
    call_defaults: ClassVar[dict[str, Any]] = {}
    #: The family's ``__call__`` docstring (None: the template's).
    call_doc: ClassVar[str | None] = None
    #: Arguments of the template the family does not take, and arguments it takes before the template's.
    call_without: ClassVar[tuple[str, ...]] = ()
    call_leading: ClassVar[tuple[inspect.Parameter, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" not in cls.__dict__ and hasattr(cls, "_compose"):
            cls.__call__ = _family_call(cls)

    @property
    def guidance_scale(self) -> float | None:
        """The guidance scale of the current (or last) call, as given (None or 1 or less: unguided)."""
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
        self,
        denoiser: Any,
        schedule: Schedule,
        shape: tuple[int, ...],
        options: SamplingOptions,
        device: torch.device,
        network_dtype: torch.dtype = torch.float32,
    ) -> SamplerOutput:
        """Start at ``init_noise_sigma · z`` and run the reverse SDE on the schedule (its times those of
        the options' grid, :func:`sampling_schedule`) with the options' combiner; ``z`` is drawn from
        ``options.generator`` or is the caller's ``options.latents`` (checked by :func:`check_latents`),
        scaled by ``init_noise_sigma`` as diffusers' ``prepare_latents`` scales them.

        The state is float32 (float64 when the network is float64, as in exactness tests) whatever
        the network's half precision; one ``generator`` drives the start (unless ``latents`` are
        given) and every step's noise.
        """
        dtype = torch.float64 if network_dtype == torch.float64 else torch.float32
        generator, latents, k = options.generator, options.latents, options.particles
        if isinstance(generator, (list, tuple)) and k > 1:  # image i's generator draws its K particles
            generator = [g for g in generator for _ in range(k)]
        x = prior_sample(
            denoiser, shape[0] * k, shape[1:], generator, device, dtype, std=schedule.init_noise_sigma, z=latents
        )
        times = schedule.times
        self._guidance_scale = options.guidance_scale
        self._num_timesteps = len(times) - 1
        self._interrupt = False
        on_step = step_callback(
            self, schedule, options.callback_on_step_end, options.callback_on_step_end_tensor_inputs
        )
        # The pipeline's own bar (diffusers' progress_bar: set_progress_bar_config applies), advanced per step.
        bar = self.progress_bar(total=self._num_timesteps) if options.progress else None

        def callback(info: StepInfo) -> torch.Tensor | None:
            if bar is not None:
                bar.update()
            return None if on_step is None else on_step(info)

        try:
            result = sample_sde(
                denoiser,
                x,
                times,
                options.combiner,
                guidance_scale=options.guidance,
                generator=generator,
                callback=callback if bar is not None or on_step is not None else None,
                final_denoise=options.sampler.final_denoise,
                interrupt=lambda: self.interrupt,
                particles=k,
                resample_threshold=options.resample_threshold,
                variance=options.sampler.variance,
                density_variance=options.density_variance,
            )
        finally:
            if bar is not None:
                bar.close()
        return result if k == 1 else one_particle_per_image(result, k, generator)

    def _superdiff_output(
        self, images: Any, result: SamplerOutput, schedule: Schedule, options: SamplingOptions
    ) -> SuperDiffPipelineOutput | tuple:
        timesteps = schedule.timestep(result.times[:-1])  # fewer than planned after an interrupt
        out = SuperDiffPipelineOutput(
            images=images,
            log_densities=result.log_densities,
            log_density_trace=result.log_density_trace,
            kappa_trace=result.kappa_trace,
            timesteps=timesteps,
            log_weights=result.log_weights,
            ess_trace=result.ess_trace,
            resample_counts=result.resample_counts,
            node_weight_trace=result.node_weight_trace,
        )
        return out if options.return_dict else out.to_tuple()

    #: How the ``latents=`` argument is laid out, for its error message.
    latents_layout: ClassVar[str] = ""

    def _checked_shape(self, call: PipelineCall) -> tuple[int, ...]:
        """Steps 1–3 of a call: every check before any network call, the shape of the latents, and the
        time grid (``call.schedule``; a Modular Diffusers pipeline runs them before its text encoders:
        :mod:`.modular`)."""
        # 1. Check inputs (the combiner checked itself): everything before any network call
        self.check_inputs(call)
        check_rows(call.options, self.num_models(call), call.batch_argument)
        # 2. Define call parameters: the image size and the shape of the latents
        shape = self.latents_shape(call)
        check_latents(call.options.latents, shape, self.latents_layout)
        # 3. Prepare timesteps, with the options' time grid (a grid that does not fit the process is refused here)
        call.schedule = sampling_schedule(self.time_grid(call), call.options.sampler)
        return shape

    def _run(self, call: PipelineCall) -> SuperDiffPipelineOutput | tuple:
        shape, schedule = self._checked_shape(call), call.schedule
        # 4. Encode prompts: the M prompts and the unconditional (negative) one, rows of one batched call
        conditions = self.encode(call)
        # 5. Prepare the denoiser: the network on all rows, its output converted to x̂₀
        denoiser = self.denoiser(call, conditions, schedule)
        # 6. Denoising loop, from the starting noise (drawn inside unless the family draws it)
        options = self.starting_noise(call, shape)
        network = self.network
        result = self._superdiff_sample(denoiser, schedule, shape, options, self._execution_device, network.dtype)
        # 7. Decode
        images = self.decode(call, result.samples)
        self.maybe_free_model_hooks()
        return self._superdiff_output(images, result, schedule, options)

    # ------------------------------------------------------------------------------------------------
    # The hooks (defaults: a text-to-image latent family with one network)
    # ------------------------------------------------------------------------------------------------

    def check_inputs(self, call: PipelineCall) -> None:
        """Raise ``ValueError`` (naming the argument, the value and what works) before any network call."""
        check_options(call.options, call.batch_argument)

    def num_models(self, call: PipelineCall) -> int:
        """The number of models composed: the prompts (a stack: its networks)."""
        return len(call.prompts)

    def latents_shape(self, call: PipelineCall) -> tuple[int, ...]:
        """The shape of the sampled latents, (B, C, H/f, W/f); fills in ``call.height`` / ``call.width``."""
        f = self.vae_scale_factor
        call.height = call.height or self.default_sample_size * f
        call.width = call.width or self.default_sample_size * f
        return (call.options.num_images_per_prompt, self.network.config.in_channels, call.height // f, call.width // f)

    def encode(self, call: PipelineCall) -> dict[str, Any]:
        """The network's keyword conditions, each with a leading dim of M+1 (prompts, then unconditional)."""
        return {}

    def time_grid(self, call: PipelineCall) -> Schedule:
        """The scheduler's grid of ``num_inference_steps`` mapped onto its process."""
        return schedule_from_scheduler(self.scheduler, call.options.num_inference_steps)

    def network_inputs(self, call: PipelineCall, schedule: Schedule) -> tuple[Callable[..., Any], Callable]:
        """The network as the denoiser calls it, and its timestep input of a process time."""
        return self.network, schedule.timestep

    def denoiser(self, call: PipelineCall, conditions: dict[str, Any], schedule: Schedule) -> Any:
        """The network on the rows of all conditions (with guidance, the unconditional row last), one call a step."""
        m, guidance = len(call.prompts), call.options.guidance
        network, timestep = self.network_inputs(call, schedule)
        return DiffusersDenoiser(
            network, schedule.process, schedule.prediction, timestep,
            conditions=guided_conditions(conditions, m, guidance), num_outputs=m + (guidance is not None),
            scale_input=schedule.scale_input, dtype=self.network.dtype, unconditional=guidance is not None,
        )

    def starting_noise(self, call: PipelineCall, shape: tuple[int, ...]) -> SamplingOptions:
        """The options the sampler starts from (``latents`` None: it draws the prior noise itself)."""
        return call.options

    def decode(self, call: PipelineCall, samples: torch.Tensor) -> Any:
        """Latents → images of ``output_type`` (the VAE's scaling, and shift where the family uses one)."""
        vae = getattr(self, "vae", None)
        shift = (vae.config.get("shift_factor") or 0.0) if self.uses_shift_factor and vae is not None else 0.0
        return decode(vae, samples, self.image_processor, call.options.output_type, shift=shift)

    #: Whether the VAE's ``shift_factor`` is subtracted from its latents (SD3, FLUX.1), as in diffusers.
    uses_shift_factor: ClassVar[bool] = False

    # ------------------------------------------------------------------------------------------------
    # diffusers' plumbing, for pipelines that are not a DiffusionPipeline
    # ------------------------------------------------------------------------------------------------

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for the sampling bar (``desc``, ``disable``, ``file``, ...), as in diffusers."""
        self._progress_bar_config = kwargs

    def progress_bar(self, total: int) -> tqdm:
        """A tqdm bar of ``total`` steps with the options of :meth:`set_progress_bar_config` (diffusers' rule)."""
        return tqdm(total=total, **getattr(self, "_progress_bar_config", {}))

    def maybe_free_model_hooks(self) -> None:
        """Nothing to free (a DiffusionPipeline frees its offloading hooks here)."""


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


def one_particle_per_image(result: SamplerOutput, particles: int, generator: Any) -> SamplerOutput:
    """Each image's particle, drawn with probability ∝ its Feynman–Kac weight from its group of K
    (:func:`~superdiff.particles.select_particles`), with its traces; the group's ESS trace and
    resampling count are repeated for it. Log-weights are made relative to the group (its
    log-sum-exp subtracted), so they say how much of the group's weight the image carried."""
    log_w = result.log_weights
    if log_w is None:
        log_w = torch.zeros(result.samples.shape[0], dtype=torch.float64, device=result.samples.device)
    pick = select_particles(log_w, particles, generator)
    relative = log_w.reshape(-1, particles) - torch.logsumexp(log_w.reshape(-1, particles), -1, keepdim=True)
    return SamplerOutput(
        samples=result.samples[pick],
        log_densities=result.log_densities[pick],
        log_density_trace=result.log_density_trace[:, pick],
        kappa_trace=result.kappa_trace[:, pick],
        times=result.times,
        log_weights=relative.reshape(-1)[pick],
        ess_trace=result.ess_trace,
        resample_counts=result.resample_counts,
        node_weight_trace=None if result.node_weight_trace is None else tuple(w[:, pick]
                                                                             for w in result.node_weight_trace),
    )


def _family_call(cls: type) -> Callable[..., Any]:
    """``cls.__call__``: the template :meth:`SuperDiffBasePipeline.__call__` with the family's defaults
    (``call_defaults``), its ``call_leading`` arguments first and without its ``call_without``; the template's
    family-only arguments that ``cls`` does not name are left out. The call goes to ``cls._compose``."""
    self_parameter, *template = inspect.signature(SuperDiffBasePipeline.__call__).parameters.values()
    parameters = [self_parameter, *cls.call_leading] + [
        p.replace(default=cls.call_defaults.get(p.name, p.default))
        for p in template
        if (p.name not in SuperDiffBasePipeline.FAMILY_ARGUMENTS or p.name in cls.call_defaults)
        and p.name not in cls.call_without
    ]
    signature = inspect.signature(SuperDiffBasePipeline.__call__).replace(parameters=parameters)
    compose = cls._compose

    @torch.no_grad()
    def __call__(self: SuperDiffLoop, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        return compose(**bound.arguments)

    __call__.__signature__ = signature  # type: ignore[attr-defined]
    __call__.__doc__ = cls.call_doc or SuperDiffBasePipeline.__call__.__doc__
    __call__.__qualname__ = f"{cls.__name__}.__call__"
    return __call__


class SuperDiffBasePipeline(DiffusionPipeline, SuperDiffLoop):
    """A diffusers text-to-image pipeline composing M prompts (subclassed by each model family).

    Load like any diffusers pipeline: ``from_pretrained(path, dtype=...)`` (``torch_dtype=`` is its
    deprecated name, with diffusers' ``FutureWarning``; both at once is a ``ValueError``), or
    ``from_pipe(pipe)`` to share an already loaded pipeline's modules; called on this base class,
    ``from_pipe`` picks the family from the pipeline's class.
    """

    #: The denoising network's attribute (``unet`` or ``transformer``).
    network_name: ClassVar[str] = "unet"
    #: The argument that is the sampler's classifier-free guidance weight.
    cfg_argument: ClassVar[str] = "guidance_scale"
    #: Template arguments only some families take (each lists them in ``call_defaults``).
    FAMILY_ARGUMENTS: ClassVar[tuple[str, ...]] = ("true_cfg_scale", "max_sequence_length")
    #: The latent pixels per side of one network token where the family packs or patchifies latents 2×2
    #: (FLUX.1, FLUX.2, Qwen-Image, Z-Image): its image processor's factor and :attr:`size_multiple` include it.
    patch: ClassVar[int] = 1
    #: The image processor the family's diffusers pipeline uses.
    image_processor_class: ClassVar[type] = VaeImageProcessor

    #: The value of :attr:`cfg_argument` above which the family guides (diffusers' ``guidance_scale > 1``).
    guides_above: ClassVar[float] = 1.0

    @classmethod
    def guides(cls, guidance_scale: float | None, true_cfg_scale: float | None, *, negative_prompt: Any = None,
               config: Mapping[str, Any] | None = None) -> bool:
        """Whether a call with these arguments (None: the family's default) guides, that is, evaluates an
        unconditional row each step: its :attr:`cfg_argument` above :attr:`guides_above`, as diffusers decides.
        ``negative_prompt``: the call's, for a family that guides only with one (Qwen-Image). ``config``: the
        pipeline's config (``model_index.json``'s keys), so the command line can count a call's rows before
        loading the model."""
        given = {"guidance_scale": guidance_scale, "true_cfg_scale": true_cfg_scale}[cls.cfg_argument]
        value = cls.call_defaults.get(cls.cfg_argument) if given is None else given
        return is_number(value) and value > cls.guides_above

    def __init__(self, **modules: Any) -> None:
        """Register the family's ``modules`` as diffusers does (each family's ``__init__`` names them, which
        diffusers reads), then the VAE factor (1 without a VAE: pixel space) and the image processor."""
        super().__init__()
        self.register_modules(**modules)
        vae = modules.get("vae")
        self.vae_scale_factor = self.vae_factor(vae) if vae is not None else 1
        self.image_processor = self.image_processor_class(vae_scale_factor=self.vae_scale_factor * self.patch)

    @staticmethod
    def vae_factor(vae: Any) -> int:
        """Image pixels per latent pixel: 2 per downsampling block of the VAE, as diffusers computes it."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def network(self) -> Any:
        """The denoising network, called once per step on every row."""
        return getattr(self, self.network_name)

    @property
    def default_sample_size(self) -> int:
        """The latent size sampled when no height / width is given: the network's ``sample_size``."""
        return self.network.config.sample_size

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE factor × :attr:`patch`, as in diffusers."""
        return self.vae_scale_factor * self.patch

    def token_grid(self, call: PipelineCall) -> tuple[int, int]:
        """The image in network tokens (latent patches), (height, width) / :attr:`size_multiple`."""
        return call.height // self.size_multiple, call.width // self.size_multiple

    def check_inputs(self, call: PipelineCall) -> None:
        """The options, the negative prompt and the image size (the combiner checked itself)."""
        check_options(call.options, scheduler=self.scheduler)
        check_text_inputs(call.negative_prompt, call.height, call.width, self.size_multiple, call.options)

    # ------------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """diffusers' ``from_pretrained``; a model whose ``model_index.json`` names another family's
        pipeline is refused (``ValueError`` naming the superdiff class that loads it). ``dtype=`` casts
        the weights (``torch.float32`` where none is given)."""
        return cls._load_pretrained(os.fspath(pretrained_model_name_or_path), pop_loading_dtype(kwargs), kwargs)

    @classmethod
    def _load_pretrained(cls, path: str, dtype: Any, kwargs: dict[str, Any]) -> Any:
        family = next(c.__name__ for c in cls.__mro__ if c.__name__ in PIPELINE_CLASS_NAMES)
        check_loading_class(path, family, kwargs, cls)
        return DiffusionPipeline.from_pretrained.__func__(cls, path, **kwargs, **diffusers_dtype(dtype))

    @classmethod
    def from_pipe(cls, pipeline: Any, **kwargs: Any) -> Any:
        """diffusers' ``from_pipe`` (the modules are shared, not copied), with ``dtype=`` as in
        :meth:`from_pretrained`; on :class:`SuperDiffBasePipeline` itself, the family of ``pipeline``."""
        if cls is SuperDiffBasePipeline:
            return superdiff_class_of(pipeline).from_pipe(pipeline, **kwargs)
        dtype = pop_dtype(kwargs)
        return DiffusionPipeline.from_pipe.__func__(cls, pipeline, **kwargs, **diffusers_dtype(dtype))

    # ------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------

    def __call__(
        self,
        prompts: Sequence[str] | None = None,
        mode: str | None = None,
        guidance_scale: float | None = 7.5,
        num_inference_steps: int = 50,
        temperature: float | None = None,
        log_weights: Sequence[float] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        true_cfg_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        progress: bool = True,
        return_dict: bool = True,
        max_sequence_length: int | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt: str | Sequence[str] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        combiner: Combiner | None = None,
        expression: Any = None,
        options: SamplerOptions | None = None,
        **sampler_options: Any,
    ) -> SuperDiffPipelineOutput | tuple:
        """Sample ``num_images_per_prompt`` images composing ``prompts`` with ``mode`` (or ``combiner``,
        or ``expression``).

        ``mode``: ``"and"`` (the default: equal densities, Prop. 6; ``log_weights`` ℓ offsets them,
        Eq. 18), ``"or"`` (the mixture, κ = softmax(T·log q + ℓ)), ``"average"`` (κ = 1/M, Liu et al.)
        or ``"sum"`` (κ = 1, Composable Diffusion). ``temperature`` T (default 1) applies to OR.
        ``combiner``: any combiner object instead (``And(rtol=1e-10)``, ``Or(temperature=2.0)``,
        ``Fixed((0.7, 0.3))``, ...); not together with ``mode``, ``temperature`` or ``log_weights``.
        ``expression``: a composition in :mod:`superdiff.expression_syntax` (or a node tree), whose
        leaves are the prompts (``""`` the empty one); not together with ``prompts`` or a combiner.
        ``negative_prompt``: the unconditional branch's text (one string, or a one-element list).
        ``guidance_scale``: classifier-free guidance w on the κ-mixture, ``x̂₀ᵘ + w(Σⱼ κⱼ x̂₀ʲ − x̂₀ᵘ)``;
        ``None`` or a value ≤ 1 samples the prompt-conditional models unguided, as diffusers does
        (no unconditional branch: M·B rows per network call). The densities tracked (and the κ of
        OR/AND) are those of the unguided prompt-conditional models (paper §4.2).
        ``callback_on_step_end(pipe, step, timestep, callback_kwargs)`` is called after every step
        with the tensors named in ``callback_on_step_end_tensor_inputs`` (default ``["latents"]``; also
        ``"denoised"``, ``"kappa"``, ``"log_densities"``), as in diffusers: it returns
        ``callback_kwargs`` (or None), and a new ``"latents"`` there replaces the state for the next
        step (the tracked densities are not adjusted for the edit); ``pipe._interrupt = True`` stops
        after the current step (:attr:`interrupt`). ``generator``: one for the whole batch, or a list
        with one per image (image k is then the image a single-image call with generator k gives).
        ``prompt`` is diffusers' name for ``prompts`` (pass one of them).
        ``latents``: the starting noise z, (``num_images_per_prompt``, C, height/f, width/f) with f
        the VAE factor; sampling starts at ``init_noise_sigma · latents``, exactly as diffusers'
        ``prepare_latents`` scales user latents (so a call with ``latents=z`` equals one whose
        generator drew z). The generator then drives only the steps' noise. ``prompt_embeds`` and
        the other precomputed embeddings are refused by name.
        The sampling options (the fields of :class:`superdiff.options.SamplerOptions`: ``particles``,
        ``resample_threshold``, ``variance``, ``density_variance``, ...) are keyword arguments, or
        ``options=SamplerOptions(...)`` whole (keyword arguments then replace its fields).
        Returns :class:`SuperDiffPipelineOutput` (or a tuple with ``return_dict=False``).
        """
        arguments = dict(locals())
        return self._compose(**{k: v for k, v in arguments.items() if k != "self"})

    def _compose(
        self, prompts: Any, mode: Any, temperature: Any, log_weights: Any, negative_prompt: Any, prompt: Any,
        combiner: Any, expression: Any, height: Any, width: Any, guidance_scale: Any, options: Any,
        sampler_options: dict[str, Any], true_cfg_scale: Any = None, max_sequence_length: Any = None,
        **arguments: Any,
    ) -> SuperDiffPipelineOutput | tuple:
        """The resolved call: the prompts and their one combiner, the options, then :meth:`_run`.
        ``arguments``: the diffusers-named options (steps, batch, generator, latents, output, callback)."""
        refuse_embeddings(**{name: arguments.pop(name) for name in (
            "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")})
        prompts, combiner = resolve_composition(expression, prompts_argument(prompts, prompt), combiner, mode,
                                                temperature, log_weights, "prompts", default_mode="and")
        cfg = {"guidance_scale": guidance_scale, "true_cfg_scale": true_cfg_scale}[self.cfg_argument]
        sampling = SamplingOptions(combiner=combiner, guidance_scale=cfg, **arguments,
                                   sampler=SamplerOptions.from_kwargs(options, **sampler_options))
        return self._run(PipelineCall(sampling, list(prompts), negative_prompt, height, width, guidance_scale,
                                      true_cfg_scale, max_sequence_length))


class FlowFamily(SuperDiffBasePipeline):
    """The base of the flow-matching transformer families (SD3, FLUX.1, FLUX.2, Qwen-Image, Z-Image): sampling
    starts at σ = 1, so an unguided composition's weights must sum to 1, the text length is checked, and the σ
    grid is diffusers' ``linspace(1, 1/N, N)`` shifted by μ from the image's token count."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    network_name = "transformer"
    #: How to guide instead, in the refusal of an unguided composition whose weights do not sum to 1 (a
    #: format string of ``call``).
    guidance_fix: ClassVar[str] = ""
    #: The family's usual ``max_sequence_length`` s (for the message) and the longest its text encoder takes.
    sequence_lengths: ClassVar[str] = ""
    longest_sequence: ClassVar[int] = 512
    #: The largest shift of μ where the scheduler's config names none (diffusers' default of the family).
    max_shift: ClassVar[float] = 1.15

    def check_inputs(self, call: PipelineCall) -> None:
        """The shared checks, then what flow sampling adds (:func:`~._common.check_flow_inputs`)."""
        super().check_inputs(call)
        check_flow_inputs(call, self.guidance_fix.format(call=call), self.sequence_lengths, self.longest_sequence)

    def flow_sigmas(self, steps: int) -> Any:
        """The σ grid before the shift: ``linspace(1, 1/N, N)``, or None where the scheduler makes its own."""
        import numpy as np

        return None if self.scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)

    def shift_mu(self, call: PipelineCall) -> float | None:
        """The grid's shift μ from the image's token count (diffusers' ``calculate_shift``, the scheduler's config)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        (h, w), config = self.token_grid(call), self.scheduler.config
        return calculate_shift(h * w, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                               config.get("base_shift", 0.5), config.get("max_shift", self.max_shift))

    def time_grid(self, call: PipelineCall) -> Schedule:
        """The scheduler's grid of :meth:`flow_sigmas`, shifted by :meth:`shift_mu` (each passed unless None)."""
        steps = call.options.num_inference_steps
        given = {"sigmas": self.flow_sigmas(steps), "mu": self.shift_mu(call)}
        return schedule_from_scheduler(self.scheduler, steps, **{k: v for k, v in given.items() if v is not None})


class DistilledGuidance:
    """The hooks of a family whose transformer takes the guidance as an input (FLUX.1-dev, FLUX.2 dev): that input
    is ``guidance_scale``, not classifier-free guidance, and is what the pipeline reports, as diffusers' does. Put it
    before :class:`FlowFamily` among the bases."""

    @property
    def guidance_scale(self) -> float | None:
        """The distilled guidance embedding of the current (or last) call (None: the network took none)."""
        return getattr(self, "_distilled_guidance", None)

    def distilled_guidance(self, call: PipelineCall, rows: int) -> torch.Tensor:
        """The transformer's ``guidance`` input: ``guidance_scale`` on each of ``rows`` rows (float32, as diffusers
        makes it), recorded for :attr:`guidance_scale`."""
        self._distilled_guidance = call.guidance_scale
        return torch.full((rows,), float(call.guidance_scale), device=self._execution_device, dtype=torch.float32)


class PackedLatents:
    """The hooks of a family whose latents are diffusers' packed 2×2 patches (FLUX.1 and its kin): a state of
    shape (B, (h/2)·(w/2), 4C), noise drawn unpacked and packed as ``FluxPipeline.prepare_latents`` draws it,
    and decoding after unpacking (the σ grid is :class:`FlowFamily`'s). Put it before :class:`FlowFamily` among
    the bases."""

    #: The 2×2 packing: images are multiples of twice the VAE factor (``FluxPipeline`` rounds other sizes down, here
    #: they are refused).
    patch = 2

    def latents_shape(self, call: PipelineCall) -> tuple[int, ...]:
        """The packed latents' shape (B, (h/2)·(w/2), 4C), h and w the latent size."""
        b, channels, h, w = super().latents_shape(call)
        return (b, (h // 2) * (w // 2), channels)

    def starting_noise(self, call: PipelineCall, shape: tuple[int, ...]) -> SamplingOptions:
        """The noise drawn as FluxPipeline draws it (unpacked, then packed); with K particles, K per image
        (image i's generator, if a list, draws its K)."""
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        options = call.options
        if options.latents is not None:
            return options
        f, k, generator = self.vae_scale_factor, options.particles, options.generator
        h, w, channels, n = call.height // f, call.width // f, shape[-1] // 4, shape[0] * options.particles
        draws = [g for g in generator for _ in range(k)] if isinstance(generator, (list, tuple)) else generator
        z = randn((n, channels, h, w), draws, self._execution_device, torch.float32)
        return dataclasses.replace(options, latents=FluxPipeline._pack_latents(z, n, channels, h, w))

    def decode(self, call: PipelineCall, samples: torch.Tensor) -> Any:
        """The packed latents (``output_type="latent"``), or unpacked and decoded by the VAE."""
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        if call.options.output_type == "latent":
            return samples
        return super().decode(call, FluxPipeline._unpack_latents(samples, call.height, call.width,
                                                                 self.vae_scale_factor))


def superdiff_class_of(pipeline: Any) -> type:
    """The superdiff pipeline class that composes an already loaded diffusers ``pipeline``, by its class
    (:data:`~.loading.PIPELINE_CLASS_NAMES`; a list of ``DDPMPipeline`` / ``DDIMPipeline`` s: the
    unconditional stack). ``ValueError`` naming the class where superdiff has none."""
    import superdiff.pipelines as pipelines

    from .loading import SUPPORTED, superdiff_class_name

    if isinstance(pipeline, (list, tuple)):
        return pipelines.SuperDiffUnconditionalPipeline
    for klass in type(pipeline).__mro__:
        target = superdiff_class_name(klass.__name__)
        if target is not None:
            return getattr(pipelines, target)
    raise ValueError(
        f"pipe=<a {type(pipeline).__name__}> is not valid: superdiff composes {SUPPORTED}, or a list of "
        "DDPMPipeline / DDIMPipeline (separately trained unconditional models)"
    )


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int | None = None, **kwargs: Any) -> Any:
    """``texts`` padded (and truncated) to ``max_length`` tokens (the tokenizer's ``model_max_length``)."""
    length = tokenizer.model_max_length if max_length is None else max_length
    return tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt",
                     **kwargs)


def clip_states(tokenizer: Any, encoder: Any, texts: Sequence[str], device: Any, max_length: int | None = None) -> Any:
    """A CLIP text encoder's output on ``texts`` with every hidden state (SDXL and SD3 read the
    penultimate one, and the pooled projection ``[0]`` of an encoder with projection)."""
    ids = tokenize(tokenizer, texts, max_length).input_ids
    return encoder(ids.to(device), output_hidden_states=True)


def compose(pipe: Any, *args: Any, **kwargs: Any) -> SuperDiffPipelineOutput | tuple:
    """Compose with an already loaded diffusers pipeline of any supported family: ``compose(sd_pipe,
    prompts=["a red circle", "a blue square"], mode="and")``. The superdiff pipeline of ``pipe``'s class
    (:func:`superdiff_class_of`) shares its modules (``from_pipe``: no copies) and is called with
    ``args`` / ``kwargs``; a superdiff pipeline is called as it is, and a list of ``DDPMPipeline`` /
    ``DDIMPipeline`` s is composed as an unconditional stack."""
    if not isinstance(pipe, SuperDiffLoop):
        pipe = superdiff_class_of(pipe).from_pipe(pipe)
    return pipe(*args, **kwargs)
