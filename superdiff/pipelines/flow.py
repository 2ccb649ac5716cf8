"""Compose prompts on flow-matching transformers, SD3-style (``SD3Transformer2DModel`` +
``FlowMatchEulerDiscreteScheduler``, velocity prediction).

The network predicts the velocity ``u = ε − x₀`` of the rectified flow ``x_t = (1 − t) x₀ + t ε``
(:class:`~superdiff.processes.RectifiedFlow`, t = the scheduler's σ after its shift). It is
converted once to ``x̂₀ = x − t u``, which is finite everywhere, so sampling starts at σ = 1 exactly
with no division by zero, where the score-form update of the authors' code (``∇log q = −ε/σ`` with
ε recovered through 1/α) gives NaN (necludov/super-diffusion issue 3). At the first step (α_s = 0)
the forward kernel's mean is 0 and its variance 1: the start ``x ~ N(0, I)`` is every model's exact
marginal at t = 1, and each model's Δlog q of that step is its reverse kernel's log-density of the
new point.

SD3.5 (Medium, Large, Large Turbo) runs here unchanged, as on diffusers' ``StableDiffusion3Pipeline``:
QK RMS-norm and MMDiT-X dual attention live inside ``SD3Transformer2DModel``, the three text encoders
are SD3's, the scheduler's shift comes from its config (``use_dynamic_shifting``: μ from the image's
sequence length). Large Turbo is sampled with ``guidance_scale`` ≤ 1. Skip-layer guidance is not supported.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .base import FlowFamily, PipelineCall, clip_states, tokenize

__all__ = ["SuperDiffFlowPipeline"]


class SuperDiffFlowPipeline(FlowFamily):
    """Superposition of M prompts on an SD3-style flow transformer. Components are named as in
    diffusers' ``StableDiffusion3Pipeline`` (so ``from_pipe`` shares them); ``text_encoder_3`` (T5)
    is optional (zeros, as in diffusers) and ``vae=None`` runs in pixel space. SD3 and SD3.5 models
    both load here (see the module docstring)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components = ["vae", "text_encoder_3", "tokenizer_3"]
    uses_shift_factor = True
    guidance_fix = "guide it: guidance_scale above 1 (e.g. 7.0; it is {call.guidance_scale!r})"
    sequence_lengths = "SD3 uses 256"
    max_shift = 1.16
    call_defaults = {"guidance_scale": 7.0, "num_inference_steps": 28, "max_sequence_length": 256}
    call_doc = """As :meth:`SuperDiffPipeline.__call__ <superdiff.pipelines.SuperDiffPipeline.__call__>`, with SD3's
        defaults (28 steps, guidance 7) and ``max_sequence_length`` for T5 (or its zeros). ``guidance_scale=None``
        (or ≤ 1) samples unguided, not with weights that do not sum to 1 (``mode="sum"``). ``latents``
        (B, C, height/f, width/f): the starting noise, used as given (``init_noise_sigma`` is 1)."""
    latents_layout = "(num_images_per_prompt, transformer channels, height / vae factor, width / vae factor)"

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
        super().__init__(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor × patch size)."""
        return self.vae_scale_factor * self.transformer.config.patch_size

    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], negative_prompt: str | None = None, max_sequence_length: int = 256
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SD3's conditioning for the M prompts and the negative one (``""``): (embeddings
        (M+1, L_clip + L_t5, D_t5), pooled (M+1, P₁+P₂)), as diffusers' ``StableDiffusion3Pipeline``
        builds it (penultimate CLIP states concatenated and zero-padded to T5's width, then T5's)."""
        texts = list(prompts) + [negative_prompt or ""]
        device, length = self._execution_device, self.tokenizer.model_max_length
        outs = [clip_states(tok, enc, texts, device, length)
                for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))]
        clip = torch.cat([out.hidden_states[-2] for out in outs], dim=-1)
        if self.text_encoder_3 is None:
            width = self.transformer.config.joint_attention_dim
            t5 = torch.zeros(len(texts), max_sequence_length, width, device=device, dtype=clip.dtype)
        else:
            ids = tokenize(self.tokenizer_3, texts, max_sequence_length, add_special_tokens=True).input_ids
            t5 = self.text_encoder_3(ids.to(device))[0].to(clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        dtype = self.transformer.dtype
        pooled = torch.cat([out[0] for out in outs], dim=-1)
        return torch.cat([clip, t5], dim=-2).to(dtype), pooled.to(dtype)

    def encode(self, call: PipelineCall) -> dict[str, Any]:
        embeddings, pooled = self.encode_prompts(call.prompts, call.negative_text, call.max_sequence_length)
        return {"encoder_hidden_states": embeddings, "pooled_projections": pooled}

    def flow_sigmas(self, steps: int) -> None:
        """None: the scheduler's own grid, as ``StableDiffusion3Pipeline`` passes no σ."""
        return None

    def shift_mu(self, call: PipelineCall) -> float | None:
        """SD3's μ from the image's sequence length, where the scheduler shifts dynamically (else None)."""
        return super().shift_mu(call) if self.scheduler.config.get("use_dynamic_shifting", False) else None
