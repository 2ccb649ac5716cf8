"""Compose prompts on FLUX.2: dev (``Flux2Pipeline``: Mistral-3 text encoder, guidance-distilled) and klein
(``Flux2KleinPipeline``: Qwen3 text encoder, true classifier-free guidance unless step-distilled).

Both share ``Flux2Transformer2DModel``, which predicts the rectified-flow velocity ``u = ε − x₀`` as
FLUX.1's does (x̂₀ = x − t u, finite at σ = 1), and diffusers' plumbing, called rather than copied:
the state is diffusers' ``latents=`` layout, the VAE latents patchified 2×2 (B, 4C, h/2, w/2), packed
into tokens (``Flux2Pipeline._pack_latents``) with their 4-D position ids around each transformer
call; the text is encoded by the pipelines' own prompt templates and hidden-state layers; the σ grid
is ``linspace(1, 1/N, N)`` shifted by ``compute_empirical_mu(image tokens, N)``.

Which densities are tracked:

* **dev** is guidance-distilled: ``guidance_scale`` is an input of the network (the distilled
  embedding, 4 by default), not classifier-free guidance, and there is no unconditional branch.
  Each prompt's velocity at that embedding, u_i(x, t) = u(x, t, c_i, g), is one model, exactly what
  ``Flux2Pipeline`` samples for prompt i; κ and the log-densities are those of these M models.
  Per step: one transformer call on M·B rows.
* **klein** (base) has no guidance input: ``guidance_scale`` > 1 is true classifier-free guidance
  from the empty prompt (or ``negative_prompt``), as in ``Flux2KleinPipeline``, applied to the
  κ-mixture, ``x̂₀ᵘ + w(Σⱼ κⱼ x̂₀ʲ − Σⱼ κⱼ x̂₀ᵘ)`` (paper §4.2). The tracked densities are those of
  the M unguided prompt models; the unconditional row only steers. Per step: one call on
  (M+1)·B rows (diffusers makes two). A step-distilled klein (``is_distilled`` in its
  ``model_index.json``: klein 4B/9B) ignores ``guidance_scale``, as in diffusers.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline, compute_empirical_mu
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from torch import Tensor

from ._common import _fail
from .base import PipelineCall, SuperDiffBasePipeline
from .denoisers import Schedule, schedule_from_scheduler
from .flow import check_flow_inputs

__all__ = ["SuperDiffFlux2Pipeline", "SuperDiffFlux2KleinPipeline"]


@dataclass
class PackedTransformer:
    """The FLUX.2 transformer on patchified latents (N, C, h, w): packed into h·w tokens for the call
    (``Flux2Pipeline._pack_latents``), with the position ids every row shares, and its velocity
    unpacked back to (N, C, h, w)."""

    transformer: Any
    shared: dict[str, Tensor]

    def __call__(self, x: Tensor, timestep: Tensor, return_dict: bool = False, **conditions: Any) -> tuple[Tensor]:
        u = self.transformer(Flux2Pipeline._pack_latents(x), timestep=timestep, return_dict=False, **conditions,
                             **self.shared)[0]
        return (u.transpose(1, 2).reshape(x.shape),)  # the inverse of _pack_latents


class _Flux2Family(SuperDiffBasePipeline):
    """What dev and klein share: latents, positions, the σ grid and decoding (module docstring)."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    network_name = "transformer"
    default_sample_size = 128  # diffusers': 1024 pixels with the VAE's factor 8
    latents_layout = ("(num_images_per_prompt, transformer in_channels, height / 2f, width / 2f): diffusers' FLUX.2 "
                      "latents=, the VAE latents patchified 2×2, f the VAE factor")
    #: diffusers' ``text_encoder_out_layers``: the text encoder's hidden states stacked into the embedding.
    text_encoder_out_layers: tuple[int, ...] = ()
    #: Whether ``output_type="latent"`` returns packed tokens (``Flux2Pipeline``) or VAE latents (klein).
    packed_latent_output: ClassVar[bool] = False

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, vae: AutoencoderKLFlux2, text_encoder: Any,
                 tokenizer: Any, transformer: Flux2Transformer2DModel) -> None:
        super().__init__()
        self.register_modules(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = Flux2ImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)

    @property
    def size_multiple(self) -> int:
        """The VAE factor × 2 (the 2×2 patches); diffusers rounds other sizes down, here they are refused."""
        return self.vae_scale_factor * 2

    def latents_shape(self, call: PipelineCall) -> tuple[int, ...]:
        b, channels, h, w = super().latents_shape(call)
        return (b, channels, h // 2, w // 2)

    def prompt_embeds(self, texts: Sequence[str], max_sequence_length: int) -> Tensor:
        """The family's text embedding of ``texts``, (K, max_sequence_length, D), diffusers' own."""
        raise NotImplementedError

    def text_rows(self, call: PipelineCall) -> list[str]:
        """The texts of the rows: the M prompts (and the unconditional one, where the family has it)."""
        return list(call.prompts)

    def encode(self, call: PipelineCall) -> dict[str, Any]:
        embeddings = self.prompt_embeds(self.text_rows(call), call.max_sequence_length)
        return {"encoder_hidden_states": embeddings.to(self._execution_device, self.transformer.dtype)}

    def time_grid(self, call: PipelineCall) -> Schedule:
        """diffusers' σ grid, shifted by μ from the image's token count and the number of steps."""
        steps, f = call.options.num_inference_steps, self.vae_scale_factor
        sigmas = None if self.scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = compute_empirical_mu((call.height // f // 2) * (call.width // f // 2), steps)
        return schedule_from_scheduler(self.scheduler, steps, sigmas=sigmas, mu=mu)

    def network_inputs(self, call: PipelineCall, schedule: Schedule) -> tuple[Any, Any]:
        """The packing transformer with diffusers' text and image position ids; σ as its timestep
        (diffusers passes timestep / 1000, which the transformer scales by 1000)."""
        device, f = self._execution_device, self.vae_scale_factor
        grid = torch.empty(1, 1, call.height // f // 2, call.width // f // 2)  # only its shape is read
        ids = {"img_ids": Flux2Pipeline._prepare_latent_ids(grid).to(device),
               "txt_ids": Flux2Pipeline._prepare_text_ids(torch.empty(1, call.max_sequence_length, 1)).to(device)}
        return PackedTransformer(self.transformer, ids), lambda sigma: sigma

    def decode(self, call: PipelineCall, samples: Tensor) -> Any:
        """Packed tokens (dev's ``output_type="latent"``), or the VAE latents (de-normalised by the VAE's
        batch-norm statistics, unpatchified) decoded, as diffusers does."""
        if call.options.output_type == "latent" and self.packed_latent_output:
            return Flux2Pipeline._pack_latents(samples)
        bn, eps = self.vae.bn, self.vae.config.batch_norm_eps
        mean = bn.running_mean.view(1, -1, 1, 1).to(samples)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(samples)
        latents = Flux2Pipeline._unpatchify_latents(samples * std + mean)
        if call.options.output_type == "latent":
            return latents
        images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0].float()
        return self.image_processor.postprocess(images.detach().cpu(), output_type=call.options.output_type)


class SuperDiffFlux2Pipeline(_Flux2Family):
    """Superposition of M prompts on FLUX.2 dev (guidance-distilled; components named as in diffusers'
    ``Flux2Pipeline``, so ``from_pipe`` shares them). Densities tracked: the module docstring."""

    text_encoder_out_layers = (10, 20, 30)
    packed_latent_output = True
    cfg_argument = "true_cfg_scale"  # not in call_defaults: no classifier-free guidance, no such argument
    call_defaults = {"guidance_scale": 4.0, "num_inference_steps": 50, "max_sequence_length": 512}
    call_doc = """As :meth:`SuperDiffPipeline.__call__ <superdiff.pipelines.SuperDiffPipeline.__call__>`, with
        ``Flux2Pipeline``'s arguments and defaults (50 steps, 1024² pixels, text length 512). ``guidance_scale``: the
        distilled guidance embedding (4.0), not classifier-free guidance; there is no unconditional branch, so no
        ``negative_prompt``. ``latents``: diffusers' starting noise (B, transformer ``in_channels``, height/2f,
        width/2f), used as given. ``output_type="latent"`` returns the packed tokens, as diffusers does."""

    @property
    def guidance_scale(self) -> float | None:
        """The distilled guidance embedding of the current (or last) call, as in ``Flux2Pipeline``."""
        return getattr(self, "_distilled_guidance", None)

    def check_inputs(self, call: PipelineCall) -> None:
        """The distilled guidance (a number: the network's input), no negative prompt, then the shared checks."""
        g = call.guidance_scale
        if not isinstance(g, numbers.Real) or isinstance(g, bool) or not math.isfinite(g) or g < 0:
            _fail("guidance_scale", g, "use a finite number >= 0: FLUX.2 dev is guidance-distilled and the guidance "
                  "is one of its inputs, e.g. 4.0 (Flux2Pipeline's default)")
        if call.negative_prompt is not None:
            _fail("negative_prompt", call.negative_prompt, "FLUX.2 dev is guidance-distilled and has no "
                  "unconditional branch for it (Flux2Pipeline takes none); compose without a negative_prompt")
        super().check_inputs(call)
        check_flow_inputs(call, "compose on a model with classifier-free guidance (FLUX.2 dev has none)",
                          "Flux2Pipeline uses 512")

    def prompt_embeds(self, texts: Sequence[str], max_sequence_length: int) -> Tensor:
        return Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            self.text_encoder, self.tokenizer, list(texts), device=self._execution_device,
            max_sequence_length=max_sequence_length, system_message=SYSTEM_MESSAGE,
            hidden_states_layers=self.text_encoder_out_layers)

    def encode(self, call: PipelineCall) -> dict[str, Any]:
        """The M prompts, and the distilled guidance, one value per row (a transformer without a
        guidance embedding ignores it, as in diffusers)."""
        conditions = super().encode(call)
        conditions["guidance"] = torch.full((len(call.prompts),), float(call.guidance_scale),
                                            device=self._execution_device, dtype=torch.float32)
        self._distilled_guidance = call.guidance_scale
        return conditions


class SuperDiffFlux2KleinPipeline(_Flux2Family):
    """Superposition of M prompts on FLUX.2 klein (components named as in diffusers' ``Flux2KleinPipeline``,
    ``is_distilled`` included). Densities tracked and guidance: the module docstring."""

    text_encoder_out_layers = (9, 18, 27)
    call_defaults = {"guidance_scale": 4.0, "num_inference_steps": 50, "max_sequence_length": 512}
    call_doc = """As :meth:`SuperDiffPipeline.__call__ <superdiff.pipelines.SuperDiffPipeline.__call__>`, with
        ``Flux2KleinPipeline``'s arguments and defaults (50 steps, 1024² pixels, guidance 4, text length 512).
        ``guidance_scale`` > 1: classifier-free guidance from ``negative_prompt`` (default the empty prompt, as
        diffusers'), ignored by a step-distilled klein. ``latents``: diffusers' starting noise (B, transformer
        ``in_channels``, height/2f, width/2f). ``output_type="latent"``: the VAE latents, as diffusers returns them."""

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, vae: AutoencoderKLFlux2, text_encoder: Any,
                 tokenizer: Any, transformer: Flux2Transformer2DModel, is_distilled: bool = False) -> None:
        super().__init__(scheduler, vae, text_encoder, tokenizer, transformer)
        self.register_to_config(is_distilled=is_distilled)

    def check_inputs(self, call: PipelineCall) -> None:
        """A step-distilled klein samples unguided whatever ``guidance_scale`` says (diffusers' rule); the checks."""
        if self.config.is_distilled:
            call.options = replace(call.options, guidance_scale=None)
        super().check_inputs(call)
        fix = f"guide it: guidance_scale above 1 (e.g. 4.0; it is {call.guidance_scale!r})"
        check_flow_inputs(call, fix + (", on a klein that is not step-distilled" if self.config.is_distilled else ""),
                          "Flux2KleinPipeline uses 512")

    def text_rows(self, call: PipelineCall) -> list[str]:
        return list(call.prompts) + [call.negative_text or ""]

    def prompt_embeds(self, texts: Sequence[str], max_sequence_length: int) -> Tensor:
        return Flux2KleinPipeline._get_qwen3_prompt_embeds(
            self.text_encoder, self.tokenizer, list(texts), device=self._execution_device,
            max_sequence_length=max_sequence_length, hidden_states_layers=self.text_encoder_out_layers)
