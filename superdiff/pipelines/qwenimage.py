"""Compose prompts on Qwen-Image (``QwenImageTransformer2DModel``, a Qwen2.5-VL text encoder, packed 2×2
latents, ``FlowMatchEulerDiscreteScheduler`` with a resolution-dependent shift). diffusers' ``QwenImagePipeline``
packs latents, draws its noise and shifts its σ grid with FLUX.1's helpers, so this adapter inherits those from
:class:`~superdiff.pipelines.SuperDiffFluxPipeline` and supplies Qwen-Image's text encoding, the image shapes its
rotary embedding reads, its guidance rule and its 3-D VAE. All rows of a step go through ONE transformer call;
which densities are tracked, and why true CFG's per-token rescale is left out, is in docs/guides/pipelines.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Mapping

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from diffusers.modular_pipelines.qwenimage.encoders import get_qwen_prompt_embeds
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
from torch import Tensor
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from ..limits import check_guidance
from ._common import _fail, is_number
from .base import FlowFamily, PipelineCall, SuperDiffBasePipeline
from .denoisers import WithSharedInputs
from .flux import SuperDiffFluxPipeline

__all__ = ["SuperDiffQwenImagePipeline"]


class SuperDiffQwenImagePipeline(SuperDiffFluxPipeline):
    """Superposition of M prompts on Qwen-Image. Components are named as in diffusers'
    ``QwenImagePipeline`` (so ``from_pipe(qwen_pipe)`` shares them). Which densities are tracked, with and
    without true classifier-free guidance: see the module docstring."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components: list[str] = []
    uses_shift_factor = False
    guidance_fix = "guide it: pass a negative_prompt (e.g. ' ') with true_cfg_scale above 1 (e.g. 4.0)"
    sequence_lengths = "QwenImagePipeline takes up to 1024"
    longest_sequence = 1024
    call_defaults = {"guidance_scale": None, "num_inference_steps": 50, "true_cfg_scale": 4.0,
                     "max_sequence_length": 512}
    call_doc = """As :meth:`SuperDiffPipeline.__call__ <superdiff.pipelines.SuperDiffPipeline.__call__>`, with
        ``QwenImagePipeline``'s arguments and defaults (50 steps, 1024² pixels, text length 512 at most 1024).
        ``true_cfg_scale`` (4.0) with a ``negative_prompt`` (e.g. ``" "``): true classifier-free guidance, one
        unconditional row more per step; without a negative prompt the prompts are sampled unguided, as in
        diffusers. ``guidance_scale`` is ignored, as there (the transformer takes no distilled guidance).
        ``latents``: diffusers' packed starting noise (B, (height/2f)·(width/2f), transformer ``in_channels``)."""
    latents_layout = ("(num_images_per_prompt, (height / 2f)·(width / 2f), 4 · latent channels): diffusers' packed "
                      "Qwen-Image latents, f the VAE factor (QwenImagePipeline._pack_latents packs them)")

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, vae: AutoencoderKLQwenImage,
                 text_encoder: Qwen2_5_VLForConditionalGeneration, tokenizer: Qwen2Tokenizer,
                 transformer: QwenImageTransformer2DModel) -> None:
        SuperDiffBasePipeline.__init__(self, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                       tokenizer=tokenizer, transformer=transformer)

    @staticmethod
    def vae_factor(vae: AutoencoderKLQwenImage) -> int:
        """Image pixels per latent pixel: 2 per temporal-downsampling stage of the 3-D VAE (diffusers' rule)."""
        return 2 ** len(vae.temperal_downsample)

    def check_inputs(self, call: PipelineCall) -> None:
        """Guidance as ``QwenImagePipeline`` applies it (true CFG needs a negative prompt), then the shared checks."""
        true_cfg, negative, ignored = call.true_cfg_scale, call.negative_prompt, call.guidance_scale
        if not is_number(true_cfg) or true_cfg < 0:
            _fail("true_cfg_scale", true_cfg, "use a finite number >= 0 (4.0, QwenImagePipeline's default, guides "
                  "with a negative_prompt; 1 or less samples without true classifier-free guidance)")
        if ignored is not None and (not is_number(ignored) or ignored < 0):
            _fail("guidance_scale", ignored, "use None or a finite number >= 0; it is ignored, as in diffusers: "
                  "Qwen-Image's transformer takes no distilled guidance (guide with true_cfg_scale and a "
                  "negative_prompt)")
        if negative is not None and true_cfg <= 1:
            _fail("negative_prompt", negative, f"it is the unconditional branch of true classifier-free guidance, "
                  f"which true_cfg_scale={true_cfg!r} turns off; pass true_cfg_scale above 1 (e.g. 4.0) or no "
                  "negative_prompt")
        if not self.guides(ignored, true_cfg, negative_prompt=negative):
            call.options = dataclasses.replace(call.options, guidance_scale=None)
        check_guidance(call.options.guidance, call.options.combiner, "true_cfg_scale")
        FlowFamily.check_inputs(self, call)  # not FLUX.1's distilled-guidance checks

    @classmethod
    def guides(cls, guidance_scale: float | None, true_cfg_scale: float | None, *, negative_prompt: Any = None,
               config: Mapping[str, Any] | None = None) -> bool:
        """``true_cfg_scale`` above 1 with a ``negative_prompt``: diffusers' QwenImagePipeline runs true
        classifier-free guidance only with one."""
        return negative_prompt is not None and super().guides(guidance_scale, true_cfg_scale, config=config)

    @torch.no_grad()
    def encode_prompts(self, texts: Sequence[str], max_sequence_length: int = 512) -> tuple[Tensor, Tensor]:
        """Qwen-Image's conditioning of each text in one text-encoder call, padded to the longest and cut at
        ``max_sequence_length`` as ``QwenImagePipeline.encode_prompt`` cuts it: (embeddings (K, L, D), mask (K, L))."""
        embeds, mask = get_qwen_prompt_embeds(self.text_encoder, self.tokenizer, list(texts),
                                              device=self._execution_device)
        n = max_sequence_length
        return embeds[:, :n].to(self.transformer.dtype), mask[:, :n]

    def encode(self, call: PipelineCall) -> dict[str, Any]:
        """The M prompts and the negative one, padded to the longest with a mask (dropped where it is all ones)."""
        embeds, mask = self.encode_prompts(call.texts, call.max_sequence_length)
        conditions = {"encoder_hidden_states": embeds}
        return conditions if bool(mask.all()) else conditions | {"encoder_hidden_states_mask": mask}

    def network_inputs(self, call: PipelineCall, schedule: Any) -> tuple[Any, Any]:
        """The transformer with the image shape its rotary embedding reads; σ as its timestep."""
        img_shapes = [[(1, *self.token_grid(call))]]
        return WithSharedInputs(self.transformer, {"img_shapes": img_shapes}), lambda sigma: sigma

    def decode(self, call: PipelineCall, samples: Tensor) -> Any:
        """The packed latents (``output_type="latent"``), or unpacked, de-normalised and decoded as one frame."""
        if call.options.output_type == "latent":
            return samples
        latents = QwenImagePipeline._unpack_latents(samples, call.height, call.width, self.vae_scale_factor)
        config, vae = self.vae.config, self.vae
        view = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(view).to(latents)
        std = torch.tensor(config.latents_std).view(view).to(latents)
        images = vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0][:, :, 0]
        return self.image_processor.postprocess(images.float().detach().cpu(), output_type=call.options.output_type)
