"""Compose prompts on FLUX.2: dev (``Flux2Pipeline``: Mistral-3 text encoder, guidance-distilled) and klein
(``Flux2KleinPipeline``: Qwen3 text encoder, true classifier-free guidance unless step-distilled).

Both share ``Flux2Transformer2DModel``, which predicts the rectified-flow velocity ``u = ε − x₀`` as
FLUX.1's does (x̂₀ = x − t u, finite at σ = 1), and diffusers' plumbing, called rather than copied:
the state is diffusers' ``latents=`` layout, the VAE latents patchified 2×2 (B, 4C, h/2, w/2), packed
into tokens (``Flux2Pipeline._pack_latents``) with their 4-D position ids around each transformer
call; the text is encoded by the pipelines' own prompt templates and hidden-state layers; the σ grid
is ``linspace(1, 1/N, N)`` shifted by ``compute_empirical_mu(image tokens, N)``.

Which densities are tracked (docs/guides/pipelines.md says it in full): dev is guidance-distilled, so each
prompt's velocity at the distilled embedding is one model and there is no unconditional branch; klein guides
the κ-mixture with the unconditional row (the empty or negative prompt), which only steers, unless it is
step-distilled (``is_distilled``), when it samples the M prompt models unguided, as diffusers does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Callable, ClassVar, Mapping

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline, compute_empirical_mu
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from torch import Tensor

from ._common import _fail, is_number
from .base import DistilledGuidance, FlowFamily, PipelineCall
from .denoisers import WithSharedInputs

__all__ = ["SuperDiffFlux2Pipeline", "SuperDiffFlux2KleinPipeline"]


class PackedTransformer(WithSharedInputs):
    """The FLUX.2 transformer on patchified latents (N, C, h, w): packed into h·w tokens for the call
    (``Flux2Pipeline._pack_latents``), with the position ids every row shares, and its velocity
    unpacked back to (N, C, h, w)."""

    def __call__(self, x: Tensor, timestep: Tensor, return_dict: bool = False, **conditions: Any) -> tuple[Tensor]:
        u = super().__call__(Flux2Pipeline._pack_latents(x), timestep, **conditions)[0]
        return (u.transpose(1, 2).reshape(x.shape),)  # the inverse of _pack_latents


class _Flux2Family(FlowFamily):
    """What dev and klein share: latents, positions, the σ grid and decoding (module docstring)."""

    default_sample_size = 128  # diffusers': 1024 pixels with the VAE's factor 8
    patch = 2  # the 2×2 patches: diffusers rounds other sizes down, here they are refused
    image_processor_class = Flux2ImageProcessor
    latents_layout = ("(num_images_per_prompt, transformer in_channels, height / 2f, width / 2f): diffusers' FLUX.2 "
                      "latents=, the VAE latents patchified 2×2, f the VAE factor")
    #: diffusers' ``text_encoder_out_layers``: the text encoder's hidden states stacked into the embedding.
    text_encoder_out_layers: tuple[int, ...] = ()
    #: diffusers' text embedding of the family, ``(text_encoder, tokenizer, texts, ...) -> (K, L, D)``, and
    #: its family-only keyword arguments.
    embed_texts: ClassVar[Callable[..., Tensor]]
    embed_options: ClassVar[dict[str, Any]] = {}
    #: Whether the rows include the unconditional text (klein's classifier-free guidance), after the M prompts.
    unconditional_row: ClassVar[bool] = False
    #: Whether ``output_type="latent"`` returns packed tokens (``Flux2Pipeline``) or VAE latents (klein).
    packed_latent_output: ClassVar[bool] = False
    call_defaults = {"guidance_scale": 4.0, "num_inference_steps": 50, "max_sequence_length": 512}
    call_doc = """As :meth:`SuperDiffPipeline.__call__ <superdiff.pipelines.SuperDiffPipeline.__call__>`, with the
        arguments and defaults of diffusers' ``Flux2Pipeline`` (dev) or ``Flux2KleinPipeline`` (klein): 50 steps,
        1024² pixels, guidance 4, text length 512. ``guidance_scale``: dev's distilled guidance embedding, not
        classifier-free guidance (no unconditional branch, so no ``negative_prompt``); klein's classifier-free
        guidance above 1, from ``negative_prompt`` (default the empty prompt), ignored by a step-distilled klein.
        ``latents``: diffusers' starting noise (B, transformer ``in_channels``, height/2f, width/2f), used as given.
        ``output_type="latent"`` returns what diffusers returns (dev: the packed tokens; klein: the VAE latents)."""

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, vae: AutoencoderKLFlux2, text_encoder: Any,
                 tokenizer: Any, transformer: Flux2Transformer2DModel) -> None:
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)

    def latents_shape(self, call: PipelineCall) -> tuple[int, ...]:
        b, channels, h, w = super().latents_shape(call)
        return (b, channels, h // 2, w // 2)

    @torch.no_grad()
    def encode_prompts(self, texts: Sequence[str], max_sequence_length: int = 512) -> Tensor:
        """diffusers' text embedding of each text (its templates and hidden-state layers): (K, L, D)."""
        embeddings = self.embed_texts(self.text_encoder, self.tokenizer, list(texts), device=self._execution_device,
                                      max_sequence_length=max_sequence_length,
                                      hidden_states_layers=self.text_encoder_out_layers, **self.embed_options)
        return embeddings.to(self._execution_device, self.transformer.dtype)

    def encode(self, call: PipelineCall) -> dict[str, Any]:
        """The rows' text embeddings: the M prompts (and klein's unconditional text)."""
        texts = call.texts if self.unconditional_row else list(call.prompts)
        return {"encoder_hidden_states": self.encode_prompts(texts, call.max_sequence_length)}

    def shift_mu(self, call: PipelineCall) -> float:
        """diffusers' μ from the image's token count and the number of steps."""
        h, w = self.token_grid(call)
        return compute_empirical_mu(h * w, call.options.num_inference_steps)

    def network_inputs(self, call: PipelineCall, schedule: Any) -> tuple[Any, Any]:
        """The packing transformer with diffusers' text and image position ids; σ as its timestep
        (diffusers passes timestep / 1000, which the transformer scales by 1000)."""
        grid = torch.empty(1, 1, *self.token_grid(call))  # only its shape is read
        ids = {"img_ids": Flux2Pipeline._prepare_latent_ids(grid).to(self._execution_device),
               "txt_ids": Flux2Pipeline._prepare_text_ids(torch.empty(1, call.max_sequence_length, 1))
               .to(self._execution_device)}
        return PackedTransformer(self.transformer, ids), lambda sigma: sigma

    def patch_statistics(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE's batch-norm mean and standard deviation of the patchified latents (1, C, 1, 1), as ``like``."""
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like)
        return mean, torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like)

    def decode(self, call: PipelineCall, samples: Tensor) -> Any:
        """Packed tokens (dev's ``output_type="latent"``), or the VAE latents (de-normalised by the VAE's
        batch-norm statistics, unpatchified) decoded, as diffusers does."""
        if call.options.output_type == "latent" and self.packed_latent_output:
            return Flux2Pipeline._pack_latents(samples)
        mean, std = self.patch_statistics(samples)
        latents = Flux2Pipeline._unpatchify_latents(samples * std + mean)
        if call.options.output_type == "latent":
            return latents
        images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0].float()
        return self.image_processor.postprocess(images.detach().cpu(), output_type=call.options.output_type)


class SuperDiffFlux2Pipeline(DistilledGuidance, _Flux2Family):
    """Superposition of M prompts on FLUX.2 dev (guidance-distilled; components named as in diffusers'
    ``Flux2Pipeline``, so ``from_pipe`` shares them). Densities tracked: the module docstring."""

    text_encoder_out_layers = (10, 20, 30)
    embed_texts = staticmethod(Flux2Pipeline._get_mistral_3_small_prompt_embeds)
    embed_options = {"system_message": SYSTEM_MESSAGE}
    packed_latent_output = True
    guidance_fix = "compose on a model with classifier-free guidance (FLUX.2 dev has none)"
    sequence_lengths = "Flux2Pipeline uses 512"
    cfg_argument = "true_cfg_scale"  # not in call_defaults: no classifier-free guidance, no such argument

    def check_inputs(self, call: PipelineCall) -> None:
        """The distilled guidance (a number: the network's input), no negative prompt, then the shared checks."""
        if not is_number(call.guidance_scale) or call.guidance_scale < 0:
            _fail("guidance_scale", call.guidance_scale, "use a finite number >= 0: FLUX.2 dev is guidance-distilled "
                  "and the guidance is one of its inputs, e.g. 4.0 (Flux2Pipeline's default)")
        if call.negative_prompt is not None:
            _fail("negative_prompt", call.negative_prompt, "FLUX.2 dev is guidance-distilled and has no "
                  "unconditional branch for it (Flux2Pipeline takes none); compose without a negative_prompt")
        super().check_inputs(call)

    def encode(self, call: PipelineCall) -> dict[str, Any]:
        """The M prompts, and the distilled guidance, one value per row (a transformer without a
        guidance embedding ignores it, as in diffusers)."""
        return super().encode(call) | {"guidance": self.distilled_guidance(call, len(call.prompts))}


class SuperDiffFlux2KleinPipeline(_Flux2Family):
    """Superposition of M prompts on FLUX.2 klein (components named as in diffusers' ``Flux2KleinPipeline``,
    ``is_distilled`` included). Densities tracked and guidance: the module docstring."""

    text_encoder_out_layers = (9, 18, 27)
    embed_texts = staticmethod(Flux2KleinPipeline._get_qwen3_prompt_embeds)
    unconditional_row = True
    sequence_lengths = "Flux2KleinPipeline uses 512"

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, vae: AutoencoderKLFlux2, text_encoder: Any,
                 tokenizer: Any, transformer: Flux2Transformer2DModel, is_distilled: bool = False) -> None:
        super().__init__(scheduler, vae, text_encoder, tokenizer, transformer)
        self.register_to_config(is_distilled=is_distilled)

    @property
    def guidance_fix(self) -> str:
        """How to guide a klein (one that is not step-distilled), for the refusal of an unguided sum."""
        fix = "guide it: guidance_scale above 1 (e.g. 4.0; it is {call.guidance_scale!r})"
        return fix + (", on a klein that is not step-distilled" if self.config.is_distilled else "")

    @classmethod
    def guides(cls, guidance_scale: float | None, true_cfg_scale: float | None, *, negative_prompt: Any = None,
               config: Mapping[str, Any] | None = None) -> bool:
        """Above 1, as diffusers decides, unless the klein is step-distilled (``config["is_distilled"]``)."""
        distilled = bool((config or {}).get("is_distilled", False))
        return not distilled and super().guides(guidance_scale, true_cfg_scale, config=config)

    def check_inputs(self, call: PipelineCall) -> None:
        """A step-distilled klein samples unguided whatever ``guidance_scale`` says (diffusers' rule); the checks."""
        if self.config.is_distilled:
            call.options = replace(call.options, guidance_scale=None)
        super().check_inputs(call)
