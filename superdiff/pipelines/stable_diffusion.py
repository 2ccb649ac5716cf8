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

import os
from typing import Any, Callable, Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTokenizer

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
)
from .denoisers import DiffusersDenoiser, schedule_from_scheduler
from .loading import (
    bare_folder_error,
    check_loading_class,
    check_safetensors_files,
    diffusers_dtype,
    is_bare_folder,
    missing_sd_subfolders,
    pop_dtype,
    pop_loading_dtype,
    scheduler_class,
    transformers_dtype,
)
from .output import SuperDiffPipelineOutput

__all__ = ["SuperDiffPipeline"]

#: ``from_pretrained`` options a folder of component subfolders (no ``model_index.json``) honours,
#: besides ``dtype`` (or its deprecated name ``torch_dtype``).
SUBFOLDER_KWARGS = ("use_safetensors", "variant", "local_files_only")


class SuperDiffPipeline(DiffusionPipeline, SuperDiffMixin):
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

    def __init__(
        self,
        vae: AutoencoderKL | None,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
    ) -> None:
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # -------------------------------------------------------------------------------------------
    # Loading
    # -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "SuperDiffPipeline":
        """diffusers' ``from_pretrained``; a local folder without ``model_index.json`` is loaded
        from its component subfolders (``vae/`` optional). A model whose ``model_index.json`` names
        an SDXL, SD3 or Flux pipeline is refused (``ValueError`` naming the superdiff class that loads it).
        ``dtype=`` casts the weights (``torch_dtype=``: its deprecated name)."""
        dtype = pop_loading_dtype(kwargs)
        path = os.fspath(pretrained_model_name_or_path)
        if is_bare_folder(path) and cls is SuperDiffPipeline:
            return cls._from_subfolders(path, dtype, **kwargs)
        check_loading_class(path, "SuperDiffPipeline", kwargs, cls)
        return super().from_pretrained(path, **kwargs, **diffusers_dtype(dtype))

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs: Any) -> "SuperDiffPipeline":
        """diffusers' ``from_pipe`` (the modules are shared, not copied), with ``dtype=`` as in
        :meth:`from_pretrained`."""
        dtype = pop_dtype(kwargs)
        return super().from_pipe(pipeline, **kwargs, **diffusers_dtype(dtype))

    @classmethod
    def _from_subfolders(cls, path: str, dtype: Any = None, **kwargs: Any) -> "SuperDiffPipeline":
        """Load each component from its subfolder with the loading options diffusers would pass it
        (``use_safetensors=True`` refuses pickle weights, as it does with ``model_index.json``).
        The scheduler class comes from diffusers' schedulers only (:func:`~.loading.scheduler_class`):
        a config naming a pipeline there would load its weights without these options."""
        unknown = sorted(set(kwargs) - set(SUBFOLDER_KWARGS))
        if unknown:
            raise ValueError(
                f"{unknown} are not supported when loading {path!r}, a folder without model_index.json; "
                f"pass only dtype and {list(SUBFOLDER_KWARGS)}, or save the pipeline with save_pretrained to use "
                "diffusers' other options"
            )
        missing = missing_sd_subfolders(path)
        if missing:
            raise bare_folder_error(path, missing)
        scheduler_cls = scheduler_class(os.path.join(path, "scheduler"))
        check_safetensors_files(path)
        files = {k: kwargs[k] for k in ("local_files_only",) if k in kwargs}
        weights = files | {k: kwargs[k] for k in ("use_safetensors", "variant") if k in kwargs}
        networks, text = weights | diffusers_dtype(dtype), weights | transformers_dtype(dtype)
        vae_dir = os.path.join(path, "vae")
        return cls(
            vae=AutoencoderKL.from_pretrained(vae_dir, **networks) if os.path.isdir(vae_dir) else None,
            text_encoder=CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), **text),
            tokenizer=CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"), **files),
            unet=UNet2DConditionModel.from_pretrained(os.path.join(path, "unet"), **networks),
            scheduler=scheduler_cls.from_pretrained(os.path.join(path, "scheduler"), **files),
        )

    # -------------------------------------------------------------------------------------------
    # Inputs
    # -------------------------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE factor, as in diffusers (the UNet takes
        latent sizes its downsampling does not divide, through its upsample sizes)."""
        return self.vae_scale_factor

    def check_inputs(self, negative_prompt: Any, height: Any, width: Any, options: SamplingOptions) -> None:
        """Raise ``ValueError`` (naming the argument, the value and what works) before any network call:
        the options, the negative prompt and the image size (the combiner checked itself)."""
        check_options(options, scheduler=self.scheduler)
        check_text_inputs(negative_prompt, height, width, self.size_multiple, options)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str | None = None) -> torch.Tensor:
        """Text embeddings (M+1, L, D) of the M prompts and the negative/unconditional one (``""``),
        in one text-encoder call."""
        texts = list(prompts) + [negative_prompt or ""]
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = self._execution_device
        mask = (
            tokens.attention_mask.to(device)
            if getattr(self.text_encoder.config, "use_attention_mask", False)
            else None
        )
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].to(self.unet.dtype)

    def _conditions(self, prompts: Sequence[str], negative_prompt: str | None, height: int, width: int) -> dict:
        """The UNet's keyword conditions, each with a leading dim of M+1 (prompts, then unconditional)."""
        return {"encoder_hidden_states": self.encode_prompts(prompts, negative_prompt)}

    # -------------------------------------------------------------------------------------------
    # Sampling
    # -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str] | None = None,
        mode: str | None = None,
        guidance_scale: float | None = 7.5,
        num_inference_steps: int = 50,
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
        """Sample ``num_images_per_prompt`` images composing ``prompts`` with ``mode`` (or ``combiner``).

        ``mode``: ``"and"`` (the default: equal densities, Prop. 6; ``log_weights`` ℓ offsets them,
        Eq. 18), ``"or"`` (the mixture, κ = softmax(T·log q + ℓ)), ``"average"`` (κ = 1/M, Liu et al.)
        or ``"sum"`` (κ = 1, Composable Diffusion). ``temperature`` T (default 1) applies to OR.
        ``combiner``: any combiner object instead (``And(rtol=1e-10)``, ``Or(temperature=2.0)``,
        ``Fixed((0.7, 0.3))``, ...); not together with ``mode``, ``temperature`` or ``log_weights``.
        ``negative_prompt``: the unconditional branch's text (one string, or a one-element list).
        ``guidance_scale``: classifier-free guidance w on the κ-mixture; ``None`` or a value ≤ 1
        samples the prompt-conditional models unguided, as diffusers does for ``guidance_scale <= 1``
        (no unconditional branch: M·B rows per network call).
        ``callback_on_step_end(pipe, step, timestep, callback_kwargs)`` is called after every step
        with the tensors named in ``callback_on_step_end_tensor_inputs`` (default ``["latents"]``; also
        ``"denoised"``, ``"kappa"``, ``"log_densities"``), as in diffusers: it returns
        ``callback_kwargs`` (or None), and a new ``"latents"`` there replaces the state for the next
        step (the tracked densities are not adjusted for the edit); ``pipe._interrupt = True`` stops
        after the current step (:attr:`interrupt`). ``generator``: one for the whole batch, or a list
        with one per image (image k is then the image a single-image call with generator k gives).
        ``prompt`` is diffusers' name for ``prompts`` (pass one of them).
        ``latents``: the starting noise z, (``num_images_per_prompt``, C, height/f, width/f) with f
        the VAE factor; sampling starts at ``init_noise_sigma · latents``, exactly as diffusers'
        ``prepare_latents`` scales user latents (so z is standard normal noise, and a call with
        ``latents=z`` equals one whose generator drew z). The generator then drives only the
        steps' noise. ``prompt_embeds`` and the other precomputed embeddings are refused by name.
        Returns :class:`SuperDiffPipelineOutput` (or a tuple with ``return_dict=False``).
        """
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
        self.check_inputs(negative_prompt, height, width, options)
        check_rows(options, m)

        # 2. Define call parameters: the image size and the shape of the latents
        f = self.vae_scale_factor
        height = height or self.unet.config.sample_size * f
        width = width or self.unet.config.sample_size * f
        shape = (num_images_per_prompt, self.unet.config.in_channels, height // f, width // f)
        check_latents(
            latents, shape, "(num_images_per_prompt, unet channels, height / vae factor, width / vae factor)"
        )

        # 3. Encode prompts: the M prompts and, with guidance, the negative (unconditional) one
        conditions = self._conditions(prompts, negative_text(negative_prompt), height, width)
        conditions = guided_conditions(conditions, m, options.guidance)

        # 4. Prepare timesteps
        schedule = schedule_from_scheduler(self.scheduler, num_inference_steps)

        # 5. Prepare the denoiser: one batched UNet call per step for every prompt (and the unconditional row)
        denoiser = DiffusersDenoiser(
            self.unet,
            schedule.process,
            schedule.prediction,
            schedule.timestep,
            conditions=conditions,
            num_outputs=m + (options.guidance is not None),
            unconditional=options.guidance is not None,
            scale_input=schedule.scale_input,
        )

        # 6. Denoising loop (the latents are drawn, or taken from latents=, inside)
        result = self._superdiff_sample(denoiser, schedule, shape, options, self._execution_device, self.unet.dtype)

        # 7. Decode
        images = decode(self.vae, result.samples, self.image_processor, output_type)
        self.maybe_free_model_hooks()
        return self._superdiff_output(images, result, schedule, options)
