"""Compose prompts on FLUX.1 (``FluxTransformer2DModel``, CLIP + T5 text encoders, packed 2×2 latents,
``FlowMatchEulerDiscreteScheduler`` with a resolution-dependent shift), through diffusers' ``FluxPipeline``
helpers. The transformer predicts the rectified flow's velocity, converted to x̂₀ as for SD3
(:mod:`superdiff.pipelines.flow`). All rows of a step (the prompts, and the negative prompt under true
classifier-free guidance) go through ONE batched transformer call; which densities are tracked for
guidance-distilled, timestep-distilled and truly guided transformers is in docs/guides/pipelines.md.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from ..limits import distilled_guidance_problem
from ._common import check_true_cfg
from .base import DistilledGuidance, FlowFamily, PackedLatents, PipelineCall, tokenize
from .denoisers import Schedule, WithSharedInputs

__all__ = ["SuperDiffFluxPipeline"]


class SuperDiffFluxPipeline(PackedLatents, DistilledGuidance, FlowFamily):
    """Superposition of M prompts on FLUX.1. Components are named as in diffusers' ``FluxPipeline``
    (so ``from_pipe(flux_pipe)`` shares them); ``vae=None`` runs in pixel space. Which densities are
    tracked, with and without true classifier-free guidance: docs/guides/pipelines.md."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components = ["vae"]
    uses_shift_factor = True
    default_sample_size = 128  # FluxPipeline's: 1024 pixels with the VAE's factor 8
    cfg_argument = "true_cfg_scale"
    guidance_fix = ("guide it: true_cfg_scale above 1 (e.g. 4.0; it is {call.true_cfg_scale!r}) with a "
                    "negative_prompt ('' for the empty prompt)")
    sequence_lengths = "FLUX.1-dev uses 512, schnell 256"
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
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)

    @property
    def true_cfg_scale(self) -> float | None:
        """The true classifier-free guidance weight of the current (or last) call, as given."""
        return getattr(self, "_guidance_scale", None)

    @property
    def guidance_distilled(self) -> bool:
        """Whether the transformer takes the distilled guidance as an input (``guidance_embeds``: FLUX.1-dev)."""
        return bool(self.transformer.config.get("guidance_embeds", False))

    def check_inputs(self, call: PipelineCall) -> None:
        """The distilled guidance and true CFG (the sampler's guidance) first, then the shared checks."""
        check_true_cfg(call.true_cfg_scale, call.guidance_scale, call.negative_prompt, call.options,
                       self.guidance_distilled)
        if self.guidance_distilled and (problem := distilled_guidance_problem(call.guidance_scale,
                                                                              self.transformer.dtype)):
            raise ValueError(problem)
        super().check_inputs(call)

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

    def encode(self, call: PipelineCall) -> dict[str, Any]:
        """The M prompts and the negative one; the distilled guidance, one value per row."""
        embeddings, pooled = self.encode_prompts(call.texts, call.max_sequence_length)
        conditions = {"encoder_hidden_states": embeddings, "pooled_projections": pooled}
        self._distilled_guidance = None
        if self.guidance_distilled:
            conditions["guidance"] = self.distilled_guidance(call, len(call.texts))
        return conditions

    def network_inputs(self, call: PipelineCall, schedule: Schedule) -> tuple[Any, Any]:
        """The transformer with the text and image position ids every row shares; σ as its timestep."""
        device, dtype, (h, w) = self._execution_device, self.transformer.dtype, self.token_grid(call)
        img_ids = FluxPipeline._prepare_latent_image_ids(call.options.num_images_per_prompt, h, w, device, dtype)
        txt_ids = torch.zeros(call.max_sequence_length, 3, device=device, dtype=dtype)
        # The transformer's timestep input is σ itself (FluxPipeline passes timestep / 1000; it scales by 1000 inside)
        return WithSharedInputs(self.transformer, {"txt_ids": txt_ids, "img_ids": img_ids}), lambda sigma: sigma
