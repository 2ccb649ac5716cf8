"""Compose prompts on FLUX.1 (``FluxTransformer2DModel``, CLIP + T5 text encoders, packed 2×2
latents, ``FlowMatchEulerDiscreteScheduler`` with a resolution-dependent shift).

The transformer predicts the velocity ``u = ε − x₀`` of the rectified flow, as SD3's does, so the
estimator and κ run as in :mod:`superdiff.pipelines.flow`: x̂₀ = x − t u, finite at σ = 1, where
sampling starts. The plumbing is diffusers' own ``FluxPipeline`` helpers: the state is the packed
latent sequence (B, (h/2)(w/2), 4C) with its image position ids, the σ grid is ``linspace(1, 1/N, N)``
shifted by ``μ = calculate_shift(image_seq_len, ...)``, and a guidance-distilled transformer takes
the distilled guidance as an input, one value per row.

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

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from ..limits import check_guidance, distilled_guidance_problem
from ..sampling import randn
from ._common import SamplingOptions, _fail
from .base import PipelineCall, SuperDiffBasePipeline, tokenize
from .denoisers import Schedule, WithSharedInputs, schedule_from_scheduler
from .flow import check_flow_inputs

__all__ = ["SuperDiffFluxPipeline"]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


class SuperDiffFluxPipeline(SuperDiffBasePipeline):
    """Superposition of M prompts on FLUX.1. Components are named as in diffusers' ``FluxPipeline``
    (so ``from_pipe(flux_pipe)`` shares them); ``vae=None`` runs in pixel space. Which densities are
    tracked, with and without true classifier-free guidance: see the module docstring."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components = ["vae"]
    network_name = "transformer"
    uses_shift_factor = True
    default_sample_size = 128  # FluxPipeline's: 1024 pixels with the VAE's factor 8
    cfg_argument = "true_cfg_scale"
    call_defaults = {"guidance_scale": 3.5, "num_inference_steps": 28, "true_cfg_scale": 1.0,
                     "max_sequence_length": 512}
    call_doc = """As :meth:`SuperDiffPipeline.__call__ <superdiff.pipelines.SuperDiffPipeline.__call__>`, with
        ``FluxPipeline``'s arguments and defaults (28 steps, 1024² pixels, T5 length 512). ``guidance_scale``: the
        distilled guidance embedding (3.5; ignored by transformers without one, e.g. FLUX.1-schnell), not
        classifier-free guidance. ``true_cfg_scale`` > 1 with a ``negative_prompt``: true classifier-free guidance,
        one unconditional row more per step; one without the other is refused. ``latents``: diffusers' packed
        starting noise (B, (height/2f)·(width/2f), transformer ``in_channels``), used as given; drawn otherwise
        as ``FluxPipeline.prepare_latents`` draws it. ``output_type="latent"`` returns the packed latents."""
    latents_layout = ("(num_images_per_prompt, (height / 2f)·(width / 2f), 4 · latent channels): diffusers' packed "
                      "Flux latents, f the VAE factor (FluxPipeline._pack_latents packs them)")

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
        self.register_modules(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        # Latents are packed in 2×2 patches, so images are multiples of twice the VAE factor (diffusers' rule).
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)

    @property
    def guidance_scale(self) -> float | None:
        """The distilled guidance embedding of the current (or last) call, as in ``FluxPipeline``."""
        return getattr(self, "_distilled_guidance", None)

    @property
    def true_cfg_scale(self) -> float | None:
        """The true classifier-free guidance weight of the current (or last) call, as given."""
        return getattr(self, "_guidance_scale", None)

    @property
    def size_multiple(self) -> int:
        """The VAE factor × 2 (the 2×2 packing); ``FluxPipeline`` rounds other sizes down, here they are refused."""
        return self.vae_scale_factor * 2

    @property
    def guidance_distilled(self) -> bool:
        """Whether the transformer takes the distilled guidance as an input (``guidance_embeds``: FLUX.1-dev)."""
        return bool(self.transformer.config.get("guidance_embeds", False))

    def check_inputs(self, call: PipelineCall) -> None:
        """The distilled guidance and true CFG (the sampler's guidance) first, then the shared checks."""
        true_cfg, guidance, negative = call.true_cfg_scale, call.guidance_scale, call.negative_prompt
        if true_cfg is not None and (not _is_number(true_cfg) or true_cfg < 0):
            _fail("true_cfg_scale", true_cfg, "use a finite number >= 0 (e.g. 4.0 with a negative_prompt; 1 or "
                  "less, or None, samples without true classifier-free guidance, as in diffusers)")
        if guidance is None and self.guidance_distilled:
            _fail("guidance_scale", None, "this transformer is guidance-distilled (guidance_embeds, as FLUX.1-dev): "
                  "the distilled guidance is one of its inputs; pass a number, e.g. 3.5 (FluxPipeline's default)")
        if guidance is not None and (not _is_number(guidance) or guidance < 0):
            _fail("guidance_scale", guidance, "use a finite number >= 0: the distilled guidance embedding, "
                  "e.g. 3.5 (true classifier-free guidance is true_cfg_scale)")
        if self.guidance_distilled and (problem := distilled_guidance_problem(guidance, self.transformer.dtype)):
            raise ValueError(problem)
        if call.options.guidance is not None and negative is None:
            _fail("true_cfg_scale", true_cfg, "true classifier-free guidance steers from a negative prompt's "
                  "velocity, and none was given (diffusers' FluxPipeline then skips it); pass negative_prompt=... "
                  "('' for the empty prompt), or true_cfg_scale=1")
        if call.options.guidance is None and negative is not None:
            _fail("negative_prompt", negative, f"it is the unconditional branch of true classifier-free "
                  f"guidance, which true_cfg_scale={true_cfg!r} turns off (it runs for true_cfg_scale > 1, as "
                  "in diffusers' FluxPipeline); pass true_cfg_scale above 1 (e.g. 4.0) or no negative_prompt")
        check_guidance(call.options.guidance, call.options.combiner, "true_cfg_scale")
        super().check_inputs(call)
        fix = (f"guide it: true_cfg_scale above 1 (e.g. 4.0; it is {true_cfg!r}) with a negative_prompt ('' for the "
               "empty prompt)")
        check_flow_inputs(call, fix, "FLUX.1-dev uses 512, schnell 256")

    @torch.no_grad()
    def encode_prompts(self, texts: Sequence[str], max_sequence_length: int = 512) -> tuple[Tensor, Tensor]:
        """Flux's conditioning of each text, as ``FluxPipeline.encode_prompt`` builds it, one call per
        encoder: (T5's last hidden states (K, max_sequence_length, D_t5), CLIP's pooled output (K, P))."""
        device = self._execution_device
        clip_ids = tokenize(self.tokenizer, texts).input_ids
        pooled = self.text_encoder(clip_ids.to(device), output_hidden_states=False).pooler_output
        t5_ids = tokenize(self.tokenizer_2, texts, max_sequence_length).input_ids
        embeddings = self.text_encoder_2(t5_ids.to(device), output_hidden_states=False)[0]
        dtype = self.transformer.dtype
        return embeddings.to(dtype), pooled.to(dtype)

    def latents_shape(self, call: PipelineCall) -> tuple[int, ...]:
        """The packed latents' shape (B, (h/2)·(w/2), 4C), h and w the latent size."""
        b, channels, h, w = super().latents_shape(call)
        return (b, (h // 2) * (w // 2), channels)

    def encode(self, call: PipelineCall) -> dict[str, Any]:
        """The M prompts and the negative one; the distilled guidance, one value per row."""
        texts = list(call.prompts) + [call.negative_text or ""]
        embeddings, pooled = self.encode_prompts(texts, call.max_sequence_length)
        conditions = {"encoder_hidden_states": embeddings, "pooled_projections": pooled}
        if self.guidance_distilled:
            device = self._execution_device
            conditions["guidance"] = torch.full((len(texts),), float(call.guidance_scale), device=device,
                                                dtype=torch.float32)
        self._distilled_guidance = call.guidance_scale if self.guidance_distilled else None
        return conditions

    def time_grid(self, call: PipelineCall) -> Schedule:
        """FluxPipeline's σ grid, shifted by μ from the image's sequence length."""
        steps, config = call.options.num_inference_steps, self.scheduler.config
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        f = self.vae_scale_factor
        mu = calculate_shift((call.height // f // 2) * (call.width // f // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        return schedule_from_scheduler(self.scheduler, steps, sigmas=sigmas, mu=mu)

    def network_inputs(self, call: PipelineCall, schedule: Schedule) -> tuple[Any, Any]:
        """The transformer with the text and image position ids every row shares; σ as its timestep."""
        device, dtype, f = self._execution_device, self.transformer.dtype, self.vae_scale_factor
        h, w = call.height // f, call.width // f
        img_ids = FluxPipeline._prepare_latent_image_ids(call.options.num_images_per_prompt, h // 2, w // 2, device,
                                                         dtype)
        txt_ids = torch.zeros(call.max_sequence_length, 3, device=device, dtype=dtype)
        # The transformer's timestep input is σ itself (FluxPipeline passes timestep / 1000; it scales by 1000 inside)
        return WithSharedInputs(self.transformer, {"txt_ids": txt_ids, "img_ids": img_ids}), lambda sigma: sigma

    def starting_noise(self, call: PipelineCall, shape: tuple[int, ...]) -> SamplingOptions:
        """The noise drawn as FluxPipeline draws it (unpacked, then packed); with K particles, K per image
        (image i's generator, if a list, draws its K)."""
        options = call.options
        if options.latents is not None:
            return options
        f, k, generator = self.vae_scale_factor, options.particles, options.generator
        h, w, channels, n = call.height // f, call.width // f, shape[-1] // 4, shape[0] * options.particles
        draws = [g for g in generator for _ in range(k)] if isinstance(generator, (list, tuple)) else generator
        z = randn((n, channels, h, w), draws, self._execution_device, torch.float32)
        return dataclasses.replace(options, latents=FluxPipeline._pack_latents(z, n, channels, h, w))

    def decode(self, call: PipelineCall, samples: Tensor) -> Any:
        """The packed latents (``output_type="latent"``), or unpacked and decoded by the VAE."""
        if call.options.output_type == "latent":
            return samples
        return super().decode(call, FluxPipeline._unpack_latents(samples, call.height, call.width,
                                                                 self.vae_scale_factor))
