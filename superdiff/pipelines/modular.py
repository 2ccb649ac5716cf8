"""SuperDiff in a Modular Diffusers pipeline: a denoise step that composes the pipeline's prompts.

diffusers builds newer pipelines from blocks (``diffusers.modular_pipelines``): a text encoder step, a
denoise step, a decode step. Its guiders combine noise predictions and cannot express SuperDiff, whose
weights κ read each prompt's tracked log-density (latents and times, not predictions). So the whole
denoise step is replaced:

* :class:`SuperDiffInputStep`, placed before the text encoder, resolves the composition (``mode``,
  ``expression``, ``combiner``, ... and the :class:`~superdiff.options.SamplerOptions` fields) and checks
  every argument before any network call; it hands the pipeline's text encoder the M prompts to encode
  (an expression's leaves) as ``prompt``, a list, which the text blocks encode as a batch of M rows.
* :class:`SuperDiffDenoiseStep`, in place of the pipeline's ``denoise`` step, reads those M rows (and the
  negative ones under guidance) from the state and runs the family's superdiff adapter
  (:class:`~superdiff.pipelines.SuperDiffXLPipeline`, :class:`~superdiff.pipelines.SuperDiffFlowPipeline`
  for SD3, :class:`~superdiff.pipelines.SuperDiffFluxPipeline`, :class:`~superdiff.pipelines.SuperDiffFlux2Pipeline`,
  :class:`~superdiff.pipelines.SuperDiffFlux2KleinPipeline`, :class:`~superdiff.pipelines.SuperDiffQwenImagePipeline`,
  :class:`~superdiff.pipelines.SuperDiffZImagePipeline`) on the pipeline's own components: the same time
  grid, starting noise, one batched network call per step and sampler as the non-modular pipeline; only the
  text encoding is the modular pipeline's. It hands the latents to the pipeline's ``decode`` step and the
  traces as ``superdiff_output``.

:func:`superdiff_blocks` makes both swaps. Text-to-image only (no image, mask, control image or IP-adapter
inputs). Classifier-free guidance (SDXL, SD3) is the pipeline's ``guider`` (a ``ClassifierFreeGuidance``), whose
``guidance_scale`` weighs the κ-mixture as the pipelines' ``guidance_scale`` does; FLUX.1's distilled
guidance is the ``guidance_scale`` input, as in ``FluxPipeline`` (FLUX.2 dev's too); FLUX.2 klein base's guider
guides with the empty prompt (its text step takes no negative prompt). Z-Image's guider weight w is
``ZImagePipeline``'s ``guidance_scale`` g = w − 1. Qwen-Image composes unguided only: its modular denoise step
rescales the guided velocity to each token's conditional norm, which the κ-affine step cannot express, so an
enabled guider is refused.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.modular_pipelines import ModularPipelineBlocks, SequentialPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import InputParam, OutputParam

from ..options import SamplerOptions, option_fields
from ._common import SamplingOptions, _fail, resolve_composition
from .base import PipelineCall

__all__ = ["SuperDiffDenoiseStep", "SuperDiffInputStep", "superdiff_blocks"]


@dataclass(frozen=True)
class ModularFamily:
    """What a modular family needs beyond its superdiff adapter: the names of the embeddings its text
    encoder step writes (``negative_<name>`` too under guidance), in the order the adapter's
    ``encode_prompts`` returns them; diffusers' denoise step whose components this one expects; where
    guidance comes from (the ``guider`` component, or a distilled ``guidance_scale`` input); the latents
    its decode step takes (``for_decode``). ``empty_negative``: the text encoder makes the unconditional
    row only from a negative prompt, so guidance without one passes ``""`` (the superdiff pipeline's
    unconditional text). ``cfg_value``: the adapter's guidance argument (its ``cfg_argument``) for the
    guider's weight w on the κ-mixture (None: unguided). ``guidance_refused``: why the family's guided
    denoise step cannot be composed (an enabled guider is then refused with it). ``takes_negative``: whether
    the text encoder step encodes a ``negative_prompt`` (else its unconditional row is the empty prompt's)."""

    adapter: str
    denoise_step: str
    embedding_names: tuple[str, ...] = ("prompt_embeds", "pooled_prompt_embeds")
    guider: bool = False
    empty_negative: bool = False
    for_decode: Callable[[Any, PipelineCall, torch.Tensor], torch.Tensor] = lambda adapter, call, latents: latents
    cfg_value: Callable[[float | None], Any] = lambda w: w
    guidance_refused: str = ""
    takes_negative: bool = True

    def state_names(self) -> list[str]:
        """The embeddings the denoise step reads from the pipeline state."""
        negatives = [f"negative_{name}" for name in self.embedding_names] if self.guider else []
        return [*self.embedding_names, *negatives]

    def embeddings(self, state: Any, guided: bool) -> Any:
        """What the adapter's ``encode_prompts`` returns: each embedding's M prompt rows (a tensor, or a list
        of rows of their own lengths), then under guidance the negative (or zero) row, which the text encoder
        may have repeated for each prompt, once; one embedding alone, not in a tuple."""
        def rows(name: str) -> Any:
            positive = state[name]
            if not guided:
                return positive
            negative = state[f"negative_{name}"]
            return [*positive, negative[0]] if isinstance(positive, list) else torch.cat([positive, negative[:1]])

        embeddings = tuple(rows(name) for name in self.embedding_names)
        return embeddings if len(embeddings) > 1 else embeddings[0]


def _unpacked(pipeline: str, adapter: Any, call: PipelineCall, latents: torch.Tensor) -> torch.Tensor:
    """The packed latents unpacked for the decode step by ``diffusers.pipelines.<pipeline>._unpack_latents``."""
    module, name = pipeline.rsplit(".", 1)
    unpack = getattr(importlib.import_module(f"diffusers.pipelines.{module}"), name)._unpack_latents
    return unpack(latents, call.height, call.width, adapter.vae_scale_factor)


def _from_tokens(adapter: Any, call: PipelineCall, tokens: torch.Tensor) -> torch.Tensor:
    """Packed tokens (B, h·w, C) as the patchified latents (B, C, h, w) a decode step takes (FLUX.2's)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *adapter.token_grid(call))


def _normalized_patches(adapter: Any, call: PipelineCall, latents: torch.Tensor) -> torch.Tensor:
    """FLUX.2 klein's VAE latents (B, C, H, W), as its superdiff pipeline returns them, patchified 2×2 and
    normalized by the VAE's batch-norm statistics: the latents its decode step de-normalizes."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    patches = Flux2Pipeline._patchify_latents(latents)
    mean, std = adapter.patch_statistics(patches)
    return (patches - mean) / std


#: The modular families by their blocks' ``model_name``.
FAMILIES: dict[str, ModularFamily] = {
    "stable-diffusion-xl": ModularFamily(
        "SuperDiffXLPipeline", "stable_diffusion_xl.denoise.StableDiffusionXLDenoiseStep", guider=True),
    "stable-diffusion-3": ModularFamily(
        "SuperDiffFlowPipeline", "stable_diffusion_3.denoise.StableDiffusion3DenoiseStep", guider=True,
        empty_negative=True),
    "flux": ModularFamily("SuperDiffFluxPipeline", "flux.denoise.FluxDenoiseStep",
                          for_decode=functools.partial(_unpacked, "flux.pipeline_flux.FluxPipeline")),
    "qwenimage": ModularFamily(
        "SuperDiffQwenImagePipeline", "qwenimage.denoise.QwenImageDenoiseStep",
        ("prompt_embeds", "prompt_embeds_mask"), guider=True,
        for_decode=functools.partial(_unpacked, "qwenimage.pipeline_qwenimage.QwenImagePipeline"),
        cfg_value=lambda w: 1.0,  # true_cfg_scale 1: no true classifier-free guidance
        guidance_refused="Qwen-Image's modular denoise step rescales the guided velocity to each token's "
        "conditional norm, which SuperDiff's step (affine in κ, as AND solves it) cannot express; disable the "
        "guider (ClassifierFreeGuidance(enabled=False)), or guide with SuperDiffQwenImagePipeline's "
        "true_cfg_scale (without the rescale)"),
    "z-image": ModularFamily(
        "SuperDiffZImagePipeline", "z_image.denoise.ZImageDenoiseStep", ("prompt_embeds",), guider=True,
        cfg_value=lambda w: 0.0 if w is None or w <= 1 else w - 1.0),  # ZImagePipeline's g weighs 1 + g
    "flux2": ModularFamily("SuperDiffFlux2Pipeline", "flux2.denoise.Flux2DenoiseStep", ("prompt_embeds",),
                           for_decode=_from_tokens),
    # klein (step-distilled, no guider) and klein base (a guider; the empty prompt's unconditional row)
    "flux2-klein": ModularFamily("SuperDiffFlux2KleinPipeline", "flux2.denoise.Flux2KleinDenoiseStep",
                                 ("prompt_embeds",), guider=True, for_decode=_normalized_patches,
                                 takes_negative=False),
}

#: Inputs of other workflows (image-to-image, inpainting, ControlNet, IP-adapter), refused by name.
OTHER_WORKFLOWS = ("image", "mask_image", "control_image", "ip_adapter_image")


def _family(model_name: Any) -> ModularFamily:
    if model_name not in FAMILIES:
        _fail("model_name", model_name, f"superdiff's modular blocks compose {sorted(FAMILIES)} pipelines")
    return FAMILIES[model_name]


class _FromState:
    """An adapter whose ``encode_prompts`` returns the embeddings the modular pipeline's text blocks made."""

    state_embeddings: Any = None

    def encode_prompts(self, *args: Any, **kwargs: Any) -> Any:
        return self.state_embeddings


@functools.cache
def _adapter_class(name: str) -> type:
    import superdiff.pipelines as pipelines

    family = getattr(pipelines, name)
    return type(f"Modular{name}", (_FromState, family), {"__doc__": _FromState.__doc__})


def _adapter(family: ModularFamily, components: Any) -> Any:
    """The family's superdiff adapter on the modular pipeline's components (shared, not copied)."""
    cls = _adapter_class(family.adapter)
    loaded = components.components
    loaded = {**getattr(components, "config", {}), **loaded}  # and the pipeline's configs (klein's is_distilled)
    parameters = inspect.signature(cls.__init__).parameters
    return cls(**{name: loaded.get(name) for name, p in list(parameters.items())[1:]
                  if name in loaded or p.default is inspect.Parameter.empty})


def _guidance_of(guider: Any) -> float | None:
    """The classifier-free guidance weight of a modular pipeline's ``guider`` (None: unguided); other
    guiders and settings superdiff does not apply are refused by name."""
    from diffusers.guiders import ClassifierFreeGuidance

    if guider is None or not guider._enabled:
        return None
    if type(guider) is not ClassifierFreeGuidance:
        _fail("guider", type(guider).__name__, "superdiff applies classifier-free guidance to the κ-mixture itself; "
              "use diffusers' ClassifierFreeGuidance (its guidance_scale is the weight), or disable the guider")
    settings = {"guidance_rescale": (guider.guidance_rescale, 0.0), "start": (guider._start, 0.0),
                "stop": (guider._stop, 1.0), "use_original_formulation": (guider.use_original_formulation, False)}
    for name, (value, default) in settings.items():
        if value != default:
            _fail(f"guider.{name}", value, f"superdiff guides every step the same way; use {default!r}")
    return guider.guidance_scale


def _option_inputs() -> list[InputParam]:
    """One input per sampling option, with its help (None: the option's default, or ``options``' value)."""
    return [InputParam(f.name, description=spec.help) for f, spec in option_fields(SamplerOptions)]


class SuperDiffInputStep(ModularPipelineBlocks):
    """Resolve a SuperDiff composition and check every argument before any network call; place it before
    the pipeline's text encoder step (:func:`superdiff_blocks` does). Its ``prompt`` output is the list of M
    prompts the text encoder encodes (an expression's leaves, in order)."""

    def __init__(self, model_name: str) -> None:
        super().__init__()
        self.family = _family(model_name)
        self.model_name = model_name

    @property
    def description(self) -> str:
        return "Resolves and checks a SuperDiff composition (prompts or expression, mode, sampling options)."

    @property
    def inputs(self) -> list[InputParam]:
        defaults = _adapter_class(self.family.adapter).call_defaults
        family_inputs = ([InputParam("negative_prompt"), InputParam("guidance_scale", description="Refused: the "
                                                                      "guider's guidance_scale is the weight.")]
                         if self.family.guider else
                         [InputParam("guidance_scale", default=defaults["guidance_scale"],
                                     description="The distilled guidance embedding (as FluxPipeline's).")])
        return [
            InputParam("prompt", description="The M prompts to compose, a list (leave out with expression)."),
            InputParam("mode", description="'and' (default), 'or', 'average' or 'sum'."),
            InputParam("temperature", description="OR's temperature T (default 1)."),
            InputParam("log_weights", description="The prompts' log-weights ℓ (AND, OR)."),
            InputParam("combiner", description="A combiner object instead of mode / temperature / log_weights."),
            InputParam("expression", description="A composition of prompts, e.g. '\"red\" & \"circle\"'."),
            InputParam("options", description="A SamplerOptions (the options below replace its fields)."),
            *_option_inputs(),
            *family_inputs,
            InputParam("num_inference_steps", default=defaults["num_inference_steps"]),
            InputParam("num_images_per_prompt", default=1),
            InputParam("generator"),
            InputParam("latents", description="The starting noise, laid out as the superdiff pipeline's latents=."),
            InputParam("height"),
            InputParam("width"),
            InputParam("progress", default=True),
            *([InputParam("max_sequence_length", default=defaults["max_sequence_length"],
                          description="T5's length (the text encoder's input).")]
              if "max_sequence_length" in defaults else []),
            *[InputParam(name) for name in OTHER_WORKFLOWS],
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [
            OutputParam("prompt", type_hint=list, description="The M prompts for the text encoder."),
            OutputParam("superdiff_call", type_hint=PipelineCall,
                        description="The checked composition and options, for SuperDiffDenoiseStep."),
        ]

    @torch.no_grad()
    def __call__(self, components: Any, state: Any) -> tuple[Any, Any]:
        block = self.get_block_state(state)
        for name in OTHER_WORKFLOWS:
            if getattr(block, name, None) is not None:
                _fail(name, "<given>", "superdiff's modular blocks compose text-to-image pipelines; use the "
                      "text2image workflow (blocks.get_workflow('text2image')) without image inputs")
        adapter = _adapter(self.family, components)
        prompts, combiner = resolve_composition(block.expression, block.prompt, block.combiner, block.mode,
                                                block.temperature, block.log_weights, "prompt", default_mode="and")
        given = {f.name: getattr(block, f.name) for f, _ in option_fields(SamplerOptions)
                 if getattr(block, f.name) is not None}
        sampler = SamplerOptions.from_kwargs(block.options, **given)
        # The guidance scale as the superdiff pipeline takes it: the guider's weight, or FLUX.1's distilled one.
        if self.family.guider:
            if block.guidance_scale is not None:  # diffusers would only warn that it is ignored
                _fail("guidance_scale", block.guidance_scale, "a modular pipeline's guidance weight is its guider's; "
                      "set it with pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=...))")
            guidance = _guidance_of(getattr(components, "guider", None))
            if guidance is not None and self.family.guidance_refused:
                _fail("guider", f"ClassifierFreeGuidance(guidance_scale={guidance!r})", self.family.guidance_refused)
            arguments = {"guidance_scale": None, "true_cfg_scale": None,
                         adapter.cfg_argument: self.family.cfg_value(guidance)}
        else:
            arguments = {"guidance_scale": block.guidance_scale, "true_cfg_scale": None}
        guidance_scale, true_cfg_scale = arguments["guidance_scale"], arguments["true_cfg_scale"]
        cfg = arguments[adapter.cfg_argument]
        options = SamplingOptions(
            combiner=combiner, guidance_scale=cfg, num_inference_steps=block.num_inference_steps,
            num_images_per_prompt=block.num_images_per_prompt, generator=block.generator, latents=block.latents,
            output_type="latent", progress=block.progress, sampler=sampler,
        )
        negative, length = getattr(block, "negative_prompt", None), getattr(block, "max_sequence_length", None)
        if negative is not None and not self.family.takes_negative:
            _fail("negative_prompt", negative, "this modular pipeline's text encoder step takes no negative prompt "
                  "(its unconditional row is the empty prompt's); compose without one")
        call = PipelineCall(options, list(prompts), negative, block.height, block.width, guidance_scale,
                            true_cfg_scale, max_sequence_length=length)
        adapter._checked_shape(call)
        if self.family.guider:  # the text encoder's negative prompt: one string (the checks allow ["text"])
            block.negative_prompt = call.negative_text
            if self.family.empty_negative and call.negative_text is None and call.options.guidance is not None:
                block.negative_prompt = ""  # the unconditional text the superdiff pipeline encodes
        block.prompt, block.superdiff_call = list(prompts), call
        self.set_block_state(state, block)
        return components, state


class SuperDiffDenoiseStep(ModularPipelineBlocks):
    """A modular pipeline's denoise step replaced by SuperDiff: the prompts the text blocks encoded are
    composed by the family's superdiff adapter (the same loop, grid, noise and one network call per step
    as the non-modular pipeline), and the latents are handed to the pipeline's decode step. Needs
    :class:`SuperDiffInputStep` before the text encoder (:func:`superdiff_blocks` places both)."""

    def __init__(self, model_name: str) -> None:
        super().__init__()
        self.family = _family(model_name)
        self.model_name = model_name
        self._progress_bar_config: dict[str, Any] = {}

    @property
    def description(self) -> str:
        return "Composes the encoded prompts with SuperDiff (AND / OR / expressions) and returns the latents."

    @property
    def expected_components(self) -> list[Any]:
        """diffusers' own denoise step's (the network, the scheduler, and the guider where it has one)."""
        module, name = self.family.denoise_step.rsplit(".", 1)
        step = getattr(importlib.import_module(f"diffusers.modular_pipelines.{module}"), name)
        return step().expected_components

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("superdiff_call", description="The composition and options SuperDiffInputStep checked."),
            *[InputParam(name) for name in self.family.state_names()],
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [
            OutputParam("latents", type_hint=torch.Tensor, description="The composed latents, for the decode step."),
            OutputParam("height", type_hint=int), OutputParam("width", type_hint=int),
            OutputParam("superdiff_output", description="The SuperDiffPipelineOutput (images: the sampled latents; "
                        "log-density, κ and particle traces)."),
        ]

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self._progress_bar_config = kwargs

    @torch.no_grad()
    def __call__(self, components: Any, state: Any) -> tuple[Any, Any]:
        block = self.get_block_state(state)
        call = block.superdiff_call
        if not isinstance(call, PipelineCall):
            raise ValueError("SuperDiffDenoiseStep needs SuperDiffInputStep before the text encoder (it resolves "
                             "the composition and checks the options first); build the blocks with "
                             "superdiff_blocks(blocks)")
        encoded = len(block.prompt_embeds)  # a tensor's rows, or a list's
        if encoded != len(call.prompts):
            raise ValueError(f"the text encoder encoded {encoded} prompts but the composition has {len(call.prompts)} "
                             f"({call.prompts}); pass the prompts to compose as prompt=[...] (or an expression), one "
                             "image's worth: num_images_per_prompt sets the images")
        adapter = _adapter(self.family, components)
        adapter.set_progress_bar_config(**self._progress_bar_config)
        if isinstance(block.prompt_embeds, torch.Tensor):  # the text length the text blocks encoded
            call.max_sequence_length = block.prompt_embeds.shape[1]
        adapter.state_embeddings = self.family.embeddings(block, call.options.guidance is not None)
        out = adapter._run(call)
        block.latents = self.family.for_decode(adapter, call, out.images)
        block.height, block.width, block.superdiff_output = call.height, call.width, out
        self.set_block_state(state, block)
        return components, state


def superdiff_blocks(blocks: SequentialPipelineBlocks) -> SequentialPipelineBlocks:
    """A copy of a modular pipeline's blocks (``StableDiffusionXLAutoBlocks()``, ``FluxAutoBlocks()``, or
    their ``get_workflow("text2image")``) whose ``denoise`` step (a workflow's ``denoise.*`` steps) is one
    :class:`SuperDiffDenoiseStep`, with :class:`SuperDiffInputStep` first. ``ValueError`` for a family
    superdiff has no adapter for, or blocks without a denoise step."""
    from diffusers.modular_pipelines.modular_pipeline_utils import InsertableDict

    model_name = blocks.model_name
    _family(model_name)
    names = list(blocks.sub_blocks)
    if not any(name == "denoise" or name.startswith("denoise.") for name in names):
        _fail("blocks", type(blocks).__name__, f"it has no 'denoise' step to replace (its steps: {names}); pass a "
              "modular pipeline's blocks, e.g. StableDiffusionXLAutoBlocks()")
    steps = InsertableDict([("superdiff_input", SuperDiffInputStep(model_name))])
    for name, block in blocks.sub_blocks.items():
        if name == "denoise" or name.startswith("denoise."):
            steps.setdefault("denoise", SuperDiffDenoiseStep(model_name))
        else:
            steps[name] = deepcopy(block)
    return SequentialPipelineBlocks.from_blocks_dict(steps)
