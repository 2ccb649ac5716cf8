"""Compose prompts on Z-Image and Z-Image-Turbo (``ZImageTransformer2DModel``, a Qwen3 text encoder,
``AutoencoderKL``, ``FlowMatchEulerDiscreteScheduler``), through diffusers' Z-Image helpers: the text
encoding, the σ grid ``linspace(1, 1/N, N)`` and its shift. The transformer takes a list of latents and of
captions of each row's own length and predicts x₀ − ε = −u, so x̂₀ = x + σ·output. All rows of a step go
through ONE transformer call; which densities are tracked, and how ``guidance_scale`` g guides the κ-mixture
with weight 1 + g (Turbo: g = 0, unguided), is in docs/guides/pipelines.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from diffusers.modular_pipelines.z_image.encoders import get_qwen_prompt_embeds
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas
from torch import Tensor
from transformers import PreTrainedModel, Qwen2Tokenizer

from ..limits import check_guidance
from ._common import _fail, is_number
from .base import FlowFamily, PipelineCall

__all__ = ["SuperDiffZImagePipeline"]


@dataclasses.dataclass
class ZImageNetwork:
    """``ZImageTransformer2DModel`` on a batch: rows (k·B + b) of ``x`` get caption ``cap_feats[k]`` (the
    conditions' row order), the list the transformer takes is built here and its output returned as the
    velocity, stacked like ``x``."""

    transformer: Any

    def __call__(self, x: Tensor, timestep: Tensor, return_dict: bool = False, cap_feats: Any = ()) -> tuple[Tensor]:
        rows = x.shape[0] // len(cap_feats)
        captions = [c for c in cap_feats for _ in range(rows)]
        out = self.transformer(list(x.unsqueeze(2).unbind(0)), timestep, captions, return_dict=False)[0]
        return (-torch.stack(out).squeeze(2),)  # the transformer predicts x₀ − ε = −u


class SuperDiffZImagePipeline(FlowFamily):
    """Superposition of M prompts on Z-Image (and Z-Image-Turbo). Components are named as in diffusers'
    ``ZImagePipeline`` (so ``from_pipe(z_pipe)`` shares them). Which densities are tracked, with and without
    guidance: see the module docstring."""

    uses_shift_factor = True
    patch = 2  # the transformer's 2×2 patches, which ZImagePipeline also requires of the image size
    guidance_fix = "guide it: guidance_scale above 0 (e.g. 5.0; it is {call.guidance_scale!r})"
    sequence_lengths = "ZImagePipeline uses 512"
    call_defaults = {"guidance_scale": 5.0, "num_inference_steps": 50, "max_sequence_length": 512}
    guides_above = 0.0  # ZImagePipeline guides for any g > 0, with weight 1 + g
    call_doc = """As :meth:`SuperDiffPipeline.__call__ <superdiff.pipelines.SuperDiffPipeline.__call__>`, with
        ``ZImagePipeline``'s arguments and defaults (50 steps, 1024² pixels, text length 512). ``guidance_scale``
        g: ``ZImagePipeline``'s classifier-free guidance, on for g > 0 (weight 1 + g, one unconditional row more
        per step); Z-Image-Turbo samples with ``guidance_scale=0.0`` and ``num_inference_steps=8`` or so.
        ``latents`` (B, C, height/f, width/f): the starting noise, used as given."""
    latents_layout = "(num_images_per_prompt, transformer in_channels, height / vae factor, width / vae factor)"

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, vae: AutoencoderKL, text_encoder: PreTrainedModel,
                 tokenizer: Qwen2Tokenizer, transformer: ZImageTransformer2DModel) -> None:
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)

    @property
    def guidance_scale(self) -> float | None:
        """``ZImagePipeline``'s guidance scale g of the current (or last) call (the weight applied is 1 + g)."""
        return getattr(self, "_z_guidance", None)

    @property
    def default_sample_size(self) -> int:
        """1024 pixels, ``ZImagePipeline``'s default height and width, in latent pixels."""
        return 1024 // self.vae_scale_factor

    @property
    def longest_sequence(self) -> int:
        """The longest text the Qwen3 encoder takes (its ``max_position_embeddings``)."""
        return self.text_encoder.config.max_position_embeddings

    def check_inputs(self, call: PipelineCall) -> None:
        """Z-Image's guidance g as the sampler's weight 1 + g (none for g = 0), then the shared checks."""
        g, negative = call.guidance_scale, call.negative_prompt
        if not is_number(g) or g < 0:
            _fail("guidance_scale", g, "use a finite number >= 0 (ZImagePipeline's default 5.0; 0.0 samples "
                  "without guidance, as Z-Image-Turbo does)")
        if negative is not None and g == 0:
            _fail("negative_prompt", negative, "it is the unconditional branch of guidance, which guidance_scale=0 "
                  "turns off; pass a guidance_scale above 0 (e.g. 5.0) or no negative_prompt")
        self._z_guidance = g
        call.options = dataclasses.replace(call.options, guidance_scale=1.0 + g if self.guides(g, None) else None)
        check_guidance(call.options.guidance, call.options.combiner, "guidance_scale")
        super().check_inputs(call)

    @torch.no_grad()
    def encode_prompts(self, texts: Sequence[str], max_sequence_length: int = 512) -> list[Tensor]:
        """Z-Image's caption features of each text in one text-encoder call: a list, each cut to its own
        tokens (L_k, D) (the transformer pads and masks them)."""
        captions = get_qwen_prompt_embeds(self.text_encoder, self.tokenizer, list(texts), self._execution_device,
                                          max_sequence_length)
        return [c.to(self.transformer.dtype) for c in captions]

    def encode(self, call: PipelineCall) -> dict[str, Any]:
        """The M prompts and the negative one (``""`` by default)."""
        return {"cap_feats": self.encode_prompts(call.texts, call.max_sequence_length)}

    def flow_sigmas(self, steps: int) -> list[float]:
        """``ZImagePipeline``'s σ grid before the shift (μ from the image's sequence length, used where the
        scheduler shifts dynamically; Z-Image-Turbo's shifts statically)."""
        return get_default_z_image_sigmas(steps)

    def network_inputs(self, call: PipelineCall, schedule: Any) -> tuple[Any, Any]:
        """The transformer on lists, its output the velocity; 1 − σ as its timestep."""
        return ZImageNetwork(self.transformer), lambda sigma: 1.0 - sigma
