"""Compose prompts on flow-matching transformers, SD3-style (``SD3Transformer2DModel`` +
``FlowMatchEulerDiscreteScheduler``, velocity prediction).

The network predicts the velocity ``u = ε − x₀`` of the rectified flow ``x_t = (1 − t) x₀ + t ε``
(:class:`~superdiff.processes.RectifiedFlow`, t = the scheduler's σ after its shift). It is
converted once to ``x̂₀ = x − t u``, which is finite everywhere, and the estimator and κ work with
x̂₀ and the Gaussian transition kernels of :mod:`superdiff.density`, whose coefficients stay
finite at α = 0. So sampling starts at σ = 1 exactly with no division by zero — where the
score-form update of the authors' code (``∇log q = −ε/σ`` with ε recovered through 1/α) gives
NaN (necludov/super-diffusion issue 3). At the first step (α_s = 0) the forward kernel's mean
``a = α_s/α_t`` is 0 and its variance σ_s² = 1: the start ``x ~ N(0, I)`` is every model's exact
marginal at t = 1 (log-densities start equal, at 0 relative to it), and each model's Δlog q of
that step is its reverse kernel's log-density of the new point.

SD3.5 (Medium, Large, Large Turbo) runs on this pipeline unchanged, as it runs on diffusers'
``StableDiffusion3Pipeline``: its differences from SD3 live in the components, not in the
sampling. The transformer's QK RMS-norm (``qk_norm``) and MMDiT-X dual attention layers
(``dual_attention_layers``) are inside ``SD3Transformer2DModel``; its three text encoders (CLIP-L,
CLIP-G, T5-XXL) are SD3's; its scheduler shift (3.0, static) is read from its
``scheduler_config.json`` by ``FlowMatchEulerDiscreteScheduler.set_timesteps``, and a scheduler with
``use_dynamic_shifting`` gets μ from the image's sequence length as below. Large Turbo is sampled
with ``guidance_scale`` ≤ 1 (no guidance, diffusers' rule). Skip-layer guidance is not supported.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.image_processor import VaeImageProcessor
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from ..combine import Combiner
from ..options import SamplerOptions
from ._common import (
    SamplingOptions,
    SuperDiffMixin,
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

__all__ = ["SuperDiffFlowPipeline"]


def _calculate_shift(image_seq_len: int, config: Any) -> float:
    """SD3/Flux's resolution-dependent shift μ (used when ``use_dynamic_shifting``)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.16)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + base_shift - m * base_len


class SuperDiffFlowPipeline(DiffusionPipeline, SuperDiffMixin):
    """Superposition of M prompts on an SD3-style flow transformer. Components are named as in
    diffusers' ``StableDiffusion3Pipeline`` (so ``from_pipe`` shares them); ``text_encoder_3`` (T5)
    is optional (zeros, as in diffusers) and ``vae=None`` runs in pixel space. SD3 and SD3.5 models
    both load here (see the module docstring)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components = ["vae", "text_encoder_3", "tokenizer_3"]

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL | None,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel | None = None,
        tokenizer_3: T5TokenizerFast | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> "SuperDiffFlowPipeline":
        """diffusers' ``from_pretrained``; a model whose ``model_index.json`` names a Stable Diffusion,
        SDXL or Flux pipeline is refused (``ValueError`` naming the superdiff class that loads it).
        ``dtype=`` casts the weights (``torch_dtype=``: its deprecated name, with diffusers' warning)."""
        dtype = pop_loading_dtype(kwargs)
        path = os.fspath(pretrained_model_name_or_path)
        check_loading_class(path, "SuperDiffFlowPipeline", kwargs, cls)
        return super().from_pretrained(path, **kwargs, **diffusers_dtype(dtype))

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs: Any) -> "SuperDiffFlowPipeline":
        """diffusers' ``from_pipe`` (e.g. of a ``StableDiffusion3Pipeline``: the modules are shared),
        with ``dtype=`` as in :meth:`from_pretrained`."""
        dtype = pop_dtype(kwargs)
        return super().from_pipe(pipeline, **kwargs, **diffusers_dtype(dtype))

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor × patch size)."""
        return self.vae_scale_factor * self.transformer.config.patch_size

    def check_inputs(
        self, negative_prompt: Any, height: Any, width: Any, max_sequence_length: Any, options: SamplingOptions
    ) -> None:
        """Raise ``ValueError`` (naming the argument, the value and what works) before any network call:
        the options, the negative prompt, the image size and T5's sequence length (the combiner
        checked itself)."""
        check_options(options, scheduler=self.scheduler)
        check_text_inputs(negative_prompt, height, width, self.size_multiple, options)
        # The sampler refuses this too, but only after the prompts are encoded; and it cannot name guidance_scale.
        if options.guidance is None and (problem := unguided_flow_problem(
            options.combiner, f"guide it: guidance_scale above 1 (e.g. 7.0; it is {options.guidance_scale!r})",
        )):
            raise ValueError(problem)
        if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= 512:
            raise ValueError(
                f"max_sequence_length={max_sequence_length!r} is not valid: use an integer in 1..512 (SD3 uses 256)"
            )

    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], negative_prompt: str | None = None, max_sequence_length: int = 256
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SD3's conditioning for the M prompts and the negative one (``""``): (embeddings
        (M+1, L_clip + L_t5, D_t5), pooled (M+1, P₁+P₂)), as diffusers' ``StableDiffusion3Pipeline``
        builds it (penultimate CLIP states concatenated and zero-padded to T5's width, then T5's)."""
        texts = list(prompts) + [negative_prompt or ""]
        device = self._execution_device
        hidden, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(
                texts,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            out = encoder(ids.input_ids.to(device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)
        width = self.transformer.config.joint_attention_dim
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(texts), max_sequence_length, width, device=device, dtype=clip.dtype)
        else:
            ids = self.tokenizer_3(texts, padding="max_length", max_length=max_sequence_length, truncation=True,
                                   add_special_tokens=True, return_tensors="pt")
            t5 = self.text_encoder_3(ids.input_ids.to(device))[0].to(clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        dtype = self.transformer.dtype
        return torch.cat([clip, t5], dim=-2).to(dtype), torch.cat(pooled, dim=-1).to(dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str] | None = None,
        mode: str | None = None,
        guidance_scale: float | None = 7.0,
        num_inference_steps: int = 28,
        temperature: float | None = None,
        log_weights: Sequence[float] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        progress: bool = True,
        return_dict: bool = True,
        max_sequence_length: int = 256,
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
        """As :meth:`SuperDiffPipeline.__call__ <superdiff.pipelines.SuperDiffPipeline.__call__>`,
        with SD3's defaults (28 steps, guidance 7) and ``max_sequence_length`` for T5 (or its zeros).
        ``guidance_scale=None`` (or ≤ 1, as in diffusers) samples unguided (not with ``mode="sum"``: see
        :meth:`check_inputs`).
        ``latents`` (B, C, height/f, width/f): the starting noise, used as given, as diffusers'
        ``StableDiffusion3Pipeline`` uses it (its scheduler's ``init_noise_sigma`` is 1)."""
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
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents, output_type=output_type,
            return_dict=return_dict, progress=progress, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self.check_inputs(negative_prompt, height, width, max_sequence_length, options)
        check_rows(options, m)

        # 2. Define call parameters: the image size and the shape of the latents
        config = self.transformer.config
        height = height or config.sample_size * self.vae_scale_factor
        width = width or config.sample_size * self.vae_scale_factor
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        shape = (num_images_per_prompt, config.in_channels, h, w)
        check_latents(
            latents, shape, "(num_images_per_prompt, transformer channels, height / vae factor, width / vae factor)"
        )

        # 3. Encode prompts: the M prompts and, with guidance, the negative (unconditional) one
        embeddings, pooled = self.encode_prompts(prompts, negative_text(negative_prompt), max_sequence_length)
        conditions = {"encoder_hidden_states": embeddings, "pooled_projections": pooled}
        conditions = guided_conditions(conditions, m, options.guidance)

        # 4. Prepare timesteps (shifted by the image's sequence length where the scheduler says so)
        kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = _calculate_shift((h // config.patch_size) * (w // config.patch_size), self.scheduler.config)
        schedule = schedule_from_scheduler(self.scheduler, num_inference_steps, **kwargs)

        # 5. Prepare the denoiser: one batched transformer call per step for every prompt (and the unconditional row)
        denoiser = DiffusersDenoiser(
            self.transformer,
            schedule.process,
            schedule.prediction,
            schedule.timestep,
            conditions=conditions,
            num_outputs=m + (options.guidance is not None),
            unconditional=options.guidance is not None,
        )

        # 6. Denoising loop (the latents are drawn, or taken from latents=, inside)
        result = self._superdiff_sample(
            denoiser, schedule, shape, options, self._execution_device, self.transformer.dtype
        )

        # 7. Decode
        shift = (self.vae.config.get("shift_factor") or 0.0) if self.vae is not None else 0.0
        images = decode(self.vae, result.samples, self.image_processor, output_type, shift=shift)
        self.maybe_free_model_hooks()
        return self._superdiff_output(images, result, schedule, options)
