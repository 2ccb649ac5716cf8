"""Compose prompts on Stable Diffusion XL: two text encoders, pooled embeddings and time ids.

Sampling, guidance, the OR sign convention and the checks are those of
:class:`~superdiff.pipelines.SuperDiffPipeline`; only the conditioning differs. The UNet receives,
for each of the M prompts and the unconditional branch, the concatenated penultimate hidden
states of both CLIP encoders, the pooled projection of the second, and SDXL's micro-conditioning
``time_ids = (H, W, 0, 0, H, W)`` — all in the same single (M+1)·B forward per step.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .base import PipelineCall, SuperDiffBasePipeline, clip_states
from .stable_diffusion import SuperDiffPipeline

__all__ = ["SuperDiffXLPipeline"]


class SuperDiffXLPipeline(SuperDiffPipeline):
    """Superposition of M prompts on SDXL. ``from_pipe(StableDiffusionXLPipeline)`` shares its modules.

    With ``force_zeros_for_empty_prompt`` (SDXL's default) and no ``negative_prompt``, the
    unconditional branch uses zero embeddings, as diffusers' SDXL pipeline does.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(
        self,
        vae: AutoencoderKL | None,
        text_encoder: CLIPTextModel | None,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer | None,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        SuperDiffBasePipeline.__init__(  # not SuperDiffPipeline's components
            self, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
        )
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)

    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], negative_prompt: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (M+1, L, D₁+D₂), pooled (M+1, P)) for the prompts and the unconditional branch,
        one call per text encoder."""
        texts = list(prompts) + [negative_prompt or ""]
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            if encoder is None:
                continue
            out = clip_states(tokenizer, encoder, texts, self._execution_device)
            if out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        embeddings = torch.cat(hidden, dim=-1)
        if negative_prompt is None and self.config.force_zeros_for_empty_prompt:
            embeddings[-1] = 0.0
            pooled[-1] = 0.0
        return embeddings.to(self.unet.dtype), pooled.to(self.unet.dtype)

    def encode(self, call: PipelineCall) -> dict[str, Any]:
        """The prompts' embeddings, pooled embeddings and time ids ``(H, W, 0, 0, H, W)``, M+1 rows each."""
        embeddings, pooled = self.encode_prompts(call.prompts, call.negative_text)
        height, width = call.height, call.width
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.unet.dtype, device=pooled.device)
        expected = self.unet.add_embedding.linear_1.in_features
        given = self.unet.config.addition_time_embed_dim * 6 + pooled.shape[-1]
        if expected != given:
            raise ValueError(
                f"the UNet expects added conditioning of size {expected} but the text encoders and time ids give "
                f"{given}; check unet.config.addition_time_embed_dim and text_encoder_2.config.projection_dim"
            )
        return {
            "encoder_hidden_states": embeddings,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.expand(embeddings.shape[0], -1)},
        }
