"""Compose prompts on Stable Diffusion 1.x / 2.x (latent space) or a pixel-space SD-shaped model.

``SuperDiffPipeline`` samples with superdiff's reverse SDE (Algorithm 1) on the time grid of the
pipeline's diffusers scheduler. Per step it makes ONE network call on the batch (M+1)·B: the M
prompts and the unconditional (or negative) prompt. Classifier-free guidance is applied to the
κ-mixture, ``x̂₀ᵘ + w(Σⱼ κⱼ x̂₀ʲ − x̂₀ᵘ)``, while the densities tracked (and the κ of OR/AND) are
those of the unguided prompt-conditional models (paper §4.2 and the authors' SD code).

OR and AND read the same tracked densities, from one estimator (see :mod:`superdiff.density` on the
sign of its quadratic term, which the authors' released SD OR branch flips).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTokenizer

from .base import PipelineCall, SuperDiffBasePipeline, tokenize
from .loading import is_bare_folder, load_sd_subfolders

__all__ = ["SuperDiffPipeline"]


class SuperDiffPipeline(SuperDiffBasePipeline):
    """Superposition of M prompts on Stable Diffusion (ε or v prediction; Euler-type σ-form or
    DDPM/DDIM-type VP schedulers). ``vae=None`` runs in pixel space (``vae_scale_factor`` 1).

    Load like any diffusers pipeline: ``SuperDiffPipeline.from_pretrained(path, dtype=...)``
    (a local folder works offline; a folder of ``unet/``, ``text_encoder/``, ``tokenizer/``,
    ``scheduler/`` [, ``vae/``] without ``model_index.json`` too), or
    ``SuperDiffPipeline.from_pipe(stable_diffusion_pipe)`` to share an already loaded pipeline's modules.
    ``torch_dtype=`` is accepted as the deprecated name of ``dtype=``, with diffusers' ``FutureWarning``
    (diffusers renamed it in v0.40); both at once is a ``ValueError``.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae"]
    call_defaults = {"guidance_scale": 7.5, "num_inference_steps": 50}
    latents_layout = "(num_images_per_prompt, unet channels, height / vae factor, width / vae factor)"

    def __init__(
        self,
        vae: AutoencoderKL | None,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
    ) -> None:
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)

    @classmethod
    def _load_pretrained(cls, path: str, dtype: Any, kwargs: dict[str, Any]) -> "SuperDiffPipeline":
        """A local folder without ``model_index.json`` is loaded from its component subfolders."""
        if is_bare_folder(path) and cls is SuperDiffPipeline:
            return load_sd_subfolders(cls, path, dtype, **kwargs)
        return super()._load_pretrained(path, dtype, kwargs)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str | None = None) -> torch.Tensor:
        """Text embeddings (M+1, L, D) of the M prompts and the negative/unconditional one (``""``),
        in one text-encoder call."""
        tokens = tokenize(self.tokenizer, list(prompts) + [negative_prompt or ""])
        device = self._execution_device
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        mask = tokens.attention_mask.to(device) if use_mask else None
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].to(self.unet.dtype)

    def encode(self, call: PipelineCall) -> dict[str, Any]:
        return {"encoder_hidden_states": self.encode_prompts(call.prompts, call.negative_text)}
