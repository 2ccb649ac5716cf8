"""Compose prompts on FLUX.1 (``FluxTransformer2DModel``, CLIP + T5 text encoders, packed 2×2
latents, ``FlowMatchEulerDiscreteScheduler`` with a resolution-dependent shift).

The transformer predicts the velocity ``u = ε − x₀`` of the rectified flow ``x_t = (1 − t) x₀ + t ε``
(:class:`~superdiff.processes.RectifiedFlow`, t = the scheduler's σ), as SD3's does, so the
estimator and κ run as in :mod:`superdiff.pipelines.flow`: x̂₀ = x − t u, finite at σ = 1, where
sampling starts. What differs is the plumbing, taken from diffusers' own ``FluxPipeline`` helpers
rather than rewritten: the state is the packed latent sequence (B, (h/2)(w/2), 4C) with its image
position ids (``_pack_latents``, ``_unpack_latents``, ``_prepare_latent_image_ids``), the σ grid is
``linspace(1, 1/N, N)`` shifted by ``μ = calculate_shift(image_seq_len, ...)``, and a
guidance-distilled transformer takes the distilled guidance as an input, one value per row.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from ..combine import Combiner
from ..limits import check_guidance
from ..options import SamplerOptions
from ..sampling import randn
from ._common import (
    SamplingOptions,
    SuperDiffMixin,
    _fail,
    check_latents,
    check_options,
    check_rows,
    check_text_inputs,
    decode,
    guided_conditions,
    negative_text,
    prompts_argument,
    refuse_embeddings,
    resolve_composition,
    unguided_flow_problem,
)
from .denoisers import DiffusersDenoiser, schedule_from_scheduler
from .loading import check_loading_class, diffusers_dtype, pop_dtype, pop_loading_dtype
from .output import SuperDiffPipelineOutput

__all__ = ["SuperDiffFluxPipeline"]


def flux_timestep(t: Tensor) -> Tensor:
    """The Flux transformer's timestep input: σ itself (``FluxPipeline`` passes ``timestep / 1000``;
    the transformer scales it, and the guidance, by 1000 inside)."""
    return t


@dataclass
class FluxTransformerCall:
    """``transformer(hidden_states, timestep=..., **conditions)`` with the inputs every row shares:
    the text and image position ids (2-D, not batched), so :class:`DiffusersDenoiser` repeats only
    the per-row conditions (embeddings, pooled embeddings, distilled guidance) over the batch."""

    transformer: Any
    txt_ids: Tensor
    img_ids: Tensor

    def __call__(self, hidden_states: Tensor, timestep: Tensor, return_dict: bool = False, **conditions: Any) -> Any:
        return self.transformer(
            hidden_states, timestep=timestep, txt_ids=self.txt_ids, img_ids=self.img_ids, return_dict=return_dict,
            **conditions,
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


class SuperDiffFluxPipeline(DiffusionPipeline, SuperDiffMixin):
    """Superposition of M prompts on FLUX.1. Components are named as in diffusers' ``FluxPipeline``
    (so ``from_pipe(flux_pipe)`` shares them); ``vae=None`` runs in pixel space.

    Which densities are tracked, and why:

    * **Guidance-distilled transformers** (``transformer.config.guidance_embeds``: FLUX.1-dev) have
      no unconditional branch: the network was trained to output, in one evaluation, the guided
      velocity at the guidance value it is given. Each prompt's velocity at the distilled
      embedding ``guidance_scale`` is one model, u_i(x, t) = u(x, t, c_i, g), and κ and the
      log-densities (Theorem 1, the Itô estimator) are those of these M models. That is the model
      the estimator needs: the field the sampler follows is built from these M fields alone, and
      each is what ``FluxPipeline`` samples for prompt i at the same ``guidance_scale``, so OR is
      the mixture and AND the equal-density point of exactly those per-prompt models. Per step:
      one transformer call on M·B rows.
    * **Timestep-distilled transformers without a guidance input** (FLUX.1-schnell): the same, with
      u_i(x, t) = u(x, t, c_i); ``guidance_scale`` is ignored, as in diffusers.
    * **True classifier-free guidance** (``true_cfg_scale`` > 1 with ``negative_prompt``, as in
      diffusers' ``FluxPipeline``): the negative prompt's velocity at the same distilled embedding
      is the unconditional row, and guidance with w = ``true_cfg_scale`` is applied to the
      κ-mixture, ``x̂₀ᵘ + w(Σⱼ κⱼ x̂₀ʲ − Σⱼ κⱼ x̂₀ᵘ)``, as the SD pipelines apply it (paper §4.2).
      The tracked densities stay those of the M prompt models above: the unconditional row only
      steers, it is not a model being composed. Per step: one call on (M+1)·B rows.

    All rows of a step, prompts and unconditional, go through ONE batched transformer call.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL | None,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
    ) -> None:
        super().__init__()
        self.register_modules(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        # Latents are packed in 2×2 patches, so images are multiples of twice the VAE factor (diffusers' rule).
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self.default_sample_size = 128  # FluxPipeline's: 1024 pixels with the VAE's factor 8

    # -------------------------------------------------------------------------------------------
    # Loading
    # -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> "SuperDiffFluxPipeline":
        """diffusers' ``from_pretrained`` (a ``FluxPipeline`` folder or hub id, or a saved superdiff
        one); a model whose ``model_index.json`` names another family's pipeline is refused
        (``ValueError`` naming the superdiff class that loads it). ``dtype=`` casts the weights
        (e.g. ``torch.bfloat16``, FLUX.1's; ``torch_dtype=``: its deprecated name, with diffusers'
        warning)."""
        dtype = pop_loading_dtype(kwargs)
        path = os.fspath(pretrained_model_name_or_path)
        check_loading_class(path, "SuperDiffFluxPipeline", kwargs, cls)
        return super().from_pretrained(path, **kwargs, **diffusers_dtype(dtype))

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs: Any) -> "SuperDiffFluxPipeline":
        """diffusers' ``from_pipe`` (e.g. of a ``FluxPipeline``: the modules are shared, not copied),
        with ``dtype=`` as in :meth:`from_pretrained`."""
        dtype = pop_dtype(kwargs)
        return super().from_pipe(pipeline, **kwargs, **diffusers_dtype(dtype))

    # -------------------------------------------------------------------------------------------
    # Inputs
    # -------------------------------------------------------------------------------------------

    @property
    def guidance_scale(self) -> float | None:
        """The distilled guidance embedding of the current (or last) call, as in ``FluxPipeline``
        (the true-CFG weight is :attr:`true_cfg_scale`)."""
        return getattr(self, "_distilled_guidance", None)

    @property
    def true_cfg_scale(self) -> float | None:
        """The true classifier-free guidance weight of the current (or last) call, as given."""
        return getattr(self, "_guidance_scale", None)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE factor × 2 (the 2×2 packing). diffusers'
        ``FluxPipeline`` rounds other sizes down with a warning; here they are refused, naming the size
        it would round to."""
        return self.vae_scale_factor * 2

    @property
    def guidance_distilled(self) -> bool:
        """Whether the transformer takes the distilled guidance as an input (``guidance_embeds``: FLUX.1-dev)."""
        return bool(self.transformer.config.get("guidance_embeds", False))

    def check_inputs(
        self,
        negative_prompt: Any,
        height: Any,
        width: Any,
        max_sequence_length: Any,
        guidance_scale: Any,
        true_cfg_scale: Any,
        options: SamplingOptions,
    ) -> None:
        """Raise ``ValueError`` (naming the argument, the value and what works) before any network
        call: the distilled guidance and true CFG (``options.guidance_scale`` is ``true_cfg_scale``,
        the sampler's guidance), the negative prompt that true CFG needs, the options, the image
        size and T5's sequence length (the combiner checked itself)."""
        if true_cfg_scale is not None and (not _is_number(true_cfg_scale) or true_cfg_scale < 0):
            _fail("true_cfg_scale", true_cfg_scale, "use a finite number >= 0 (e.g. 4.0 with a negative_prompt; 1 or "
                  "less, or None, samples without true classifier-free guidance, as in diffusers)")
        if guidance_scale is None and self.guidance_distilled:
            _fail("guidance_scale", None, "this transformer is guidance-distilled (guidance_embeds, as FLUX.1-dev): "
                  "the distilled guidance is one of its inputs; pass a number, e.g. 3.5 (FluxPipeline's default)")
        if guidance_scale is not None and (not _is_number(guidance_scale) or guidance_scale < 0):
            _fail("guidance_scale", guidance_scale, "use a finite number >= 0: the distilled guidance embedding, "
                  "e.g. 3.5 (true classifier-free guidance is true_cfg_scale)")
        if options.guidance is not None and negative_prompt is None:
            _fail("true_cfg_scale", true_cfg_scale, "true classifier-free guidance steers from a negative prompt's "
                  "velocity, and none was given (diffusers' FluxPipeline then skips it); pass negative_prompt=... "
                  "('' for the empty prompt), or true_cfg_scale=1")
        if options.guidance is None and negative_prompt is not None:
            _fail("negative_prompt", negative_prompt, f"it is the unconditional branch of true classifier-free "
                  f"guidance, which true_cfg_scale={true_cfg_scale!r} turns off (it runs for true_cfg_scale > 1, as "
                  "in diffusers' FluxPipeline); pass true_cfg_scale above 1 (e.g. 4.0) or no negative_prompt")
        check_guidance(options.guidance, options.combiner, "true_cfg_scale")
        check_options(options, scheduler=self.scheduler)
        check_text_inputs(negative_prompt, height, width, self.size_multiple, options)
        # The sampler refuses this too, but only after the prompts are encoded; and it cannot name true_cfg_scale.
        if options.guidance is None and (problem := unguided_flow_problem(
            options.combiner, f"guide it: true_cfg_scale above 1 (e.g. 4.0; it is {true_cfg_scale!r}) with a "
            "negative_prompt ('' for the empty prompt)",
        )):
            raise ValueError(problem)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or not (
            1 <= max_sequence_length <= 512
        ):
            _fail("max_sequence_length", max_sequence_length, "use an integer in 1..512 (FLUX.1-dev uses 512, "
                  "schnell 256)")

    @torch.no_grad()
    def encode_prompts(self, texts: Sequence[str], max_sequence_length: int = 512) -> tuple[Tensor, Tensor]:
        """Flux's conditioning of each text, as diffusers' ``FluxPipeline.encode_prompt`` builds it, in
        one call per encoder: (T5's last hidden states (K, max_sequence_length, D_t5), CLIP's pooled
        output (K, P))."""
        device = self._execution_device
        clip_ids = self.tokenizer(
            list(texts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = self.text_encoder(clip_ids.to(device), output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(
            list(texts), padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids
        embeddings = self.text_encoder_2(t5_ids.to(device), output_hidden_states=False)[0]
        dtype = self.transformer.dtype
        return embeddings.to(dtype), pooled.to(dtype)

    # -------------------------------------------------------------------------------------------
    # Sampling
    # -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str] | None = None,
        mode: str | None = None,
        guidance_scale: float | None = 3.5,
        num_inference_steps: int = 28,
        temperature: float | None = None,
        log_weights: Sequence[float] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        true_cfg_scale: float | None = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        progress: bool = True,
        return_dict: bool = True,
        max_sequence_length: int = 512,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt: str | Sequence[str] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        combiner: Combiner | None = None,
        expression: Any = None,
        **sampler_options: Any,
    ) -> SuperDiffPipelineOutput | tuple:
        """As :meth:`SuperDiffPipeline.__call__ <superdiff.pipelines.SuperDiffPipeline.__call__>`, with
        ``FluxPipeline``'s arguments and defaults (28 steps, 1024² pixels, T5 length 512); an
        ``expression``'s leaves are prompts like any other (``""``, NOT's default reference, is the
        empty prompt's velocity at the same distilled guidance):

        ``guidance_scale``: the distilled guidance embedding (3.5; ignored by transformers without
        one, e.g. FLUX.1-schnell), not classifier-free guidance. ``true_cfg_scale`` > 1 with a
        ``negative_prompt``: true classifier-free guidance, one unconditional row more per step
        (see the class docstring for the densities tracked either way); a negative prompt without
        it, or it without one, is refused. ``latents``: diffusers' packed starting noise
        (B, (height/2f)·(width/2f), transformer ``in_channels``), f the VAE factor, used as given;
        drawn from ``generator`` otherwise, unpacked (B, in_channels/4, height/f, width/f) and
        packed, as ``FluxPipeline.prepare_latents`` draws it. ``output_type="latent"`` returns the
        packed latents, as diffusers does. Sizes must be multiples of :attr:`size_multiple`.
        """
        # 1. Check inputs: the prompts, the one combiner of the call, then the options
        refuse_embeddings(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )
        prompts = prompts_argument(prompts, prompt)
        prompts, combiner = resolve_composition(expression, prompts, combiner, mode, temperature, log_weights,
                                                "prompts", default_mode="and")
        m = len(prompts)
        options = SamplingOptions(
            combiner=combiner, sampler=SamplerOptions.from_kwargs(**sampler_options),
            num_inference_steps=num_inference_steps, guidance_scale=true_cfg_scale,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents, output_type=output_type,
            return_dict=return_dict, progress=progress, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self.check_inputs(negative_prompt, height, width, max_sequence_length, guidance_scale, true_cfg_scale, options)
        check_rows(options, m)

        # 2. Define call parameters: the image size, the packed latents' shape and their position ids
        f = self.vae_scale_factor
        height = height or self.default_sample_size * f
        width = width or self.default_sample_size * f
        h, w = height // f, width // f
        channels = self.transformer.config.in_channels // 4
        shape = (num_images_per_prompt, (h // 2) * (w // 2), channels * 4)
        check_latents(latents, shape, "(num_images_per_prompt, (height / 2f)·(width / 2f), 4 · latent channels): "
                      "diffusers' packed Flux latents, f the VAE factor (FluxPipeline._pack_latents packs them)")
        device, dtype = self._execution_device, self.transformer.dtype
        img_ids = FluxPipeline._prepare_latent_image_ids(num_images_per_prompt, h // 2, w // 2, device, dtype)

        # 3. Encode prompts: the M prompts and the negative one; the distilled guidance, one value per row
        embeddings, pooled = self.encode_prompts(list(prompts) + [negative_text(negative_prompt) or ""],
                                                 max_sequence_length)
        conditions = {"encoder_hidden_states": embeddings, "pooled_projections": pooled}
        if self.guidance_distilled:
            conditions["guidance"] = torch.full((m + 1,), float(guidance_scale), device=device, dtype=torch.float32)
        conditions = guided_conditions(conditions, m, options.guidance)
        txt_ids = torch.zeros(embeddings.shape[1], 3, device=device, dtype=dtype)

        # 4. Prepare timesteps: FluxPipeline's σ grid, shifted by μ from the image's sequence length
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if self.scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        config = self.scheduler.config
        mu = calculate_shift(
            shape[1],
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        schedule = schedule_from_scheduler(self.scheduler, num_inference_steps, sigmas=sigmas, mu=mu)

        # 5. Prepare the denoiser: one batched transformer call per step for every prompt (and the unconditional row)
        denoiser = DiffusersDenoiser(
            FluxTransformerCall(self.transformer, txt_ids, img_ids),
            schedule.process,
            schedule.prediction,
            flux_timestep,
            conditions=conditions,
            num_outputs=m + (options.guidance is not None),
            dtype=dtype,
            unconditional=options.guidance is not None,
        )

        # 6. Denoising loop, from the starting noise drawn as FluxPipeline draws it (unpacked, then packed);
        #    with K particles, K per image (image i's generator, if a list, draws its K)
        if latents is None:
            k = options.particles
            draws = [g for g in generator for _ in range(k)] if isinstance(generator, (list, tuple)) else generator
            z = randn((num_images_per_prompt * k, channels, h, w), draws, device, torch.float32)
            options = dataclasses.replace(
                options, latents=FluxPipeline._pack_latents(z, num_images_per_prompt * k, channels, h, w)
            )
        self._distilled_guidance = guidance_scale if self.guidance_distilled else None
        result = self._superdiff_sample(denoiser, schedule, shape, options, device, dtype)

        # 7. Decode: unpack the latents, then the VAE (its scaling and shift factors)
        if output_type == "latent":
            images = result.samples
        else:
            unpacked = FluxPipeline._unpack_latents(result.samples, height, width, f)
            shift = (self.vae.config.get("shift_factor") or 0.0) if self.vae is not None else 0.0
            images = decode(self.vae, unpacked, self.image_processor, output_type, shift=shift)
        self.maybe_free_model_hooks()
        return self._superdiff_output(images, result, schedule, options)
