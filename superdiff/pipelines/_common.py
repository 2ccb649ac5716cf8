"""Plumbing shared by the superdiff pipelines: the call's options and their checks, the composition
of a call, the conditions' rows, the sampling schedule and decoding (the loop is in :mod:`.base`)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from ..combine import Combiner, check_combiner, make_combiner
from ..expressions import NODE_TYPES, compile_expression, leaf_names
from ..limits import check_guidance, rows_problem
from ..options import DENSITY_VARIANCES, SamplerOptions, check_particles_apply  # noqa: F401 (the old name)
from .denoisers import Schedule, steps_problem

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
#: What ``callback_on_step_end`` can ask for (``callback_on_step_end_tensor_inputs``): the state after
#: the step, the mixed x̂₀ that drove it, κ (B, M) and the log-densities (B, M).
CALLBACK_TENSOR_INPUTS = ("latents", "denoised", "kappa", "log_densities")


def _fail(argument: str, given: Any, works: str) -> None:
    raise ValueError(f"{argument}={given!r} is not valid: {works}")


def unguided_flow_problem(combiner: Any, guidance_fix: str) -> str | None:
    """Why ``combiner`` cannot run without guidance on a flow model, naming the composition (its
    expression and degree, or its weights), or None where it can: weights that do not sum to 1 have
    no denoised form at σ = 1, where flow sampling starts. ``guidance_fix`` says how to guide instead."""
    if getattr(combiner, "affine", True):
        return None
    if hasattr(combiner, "expression") and hasattr(combiner, "degree"):
        from ..expressions import describe

        name = f"expression {describe(combiner.expression)!r} has degree {combiner.degree:g}"
    elif getattr(combiner, "weights", None) is not None:
        weights = tuple(combiner.weights)
        name = f"combiner's weights {weights} sum to {sum(weights):g}"
    else:
        name = f"combiner {combiner!r} has weights that do not sum to 1"
    return (f"the {name}: without guidance, weights that do not sum to 1 (mode='sum', or an expression whose "
            "degree is not 1, such as a product of two) have no denoised form at σ = 1, where flow sampling starts; "
            "use mode 'and', 'or' or 'average' (or an expression of degree 1: an or, a softmin, exponents summing "
            f"to 1), or {guidance_fix}")


def check_flow_inputs(call: Any, guidance_fix: str, lengths: str, longest: int = 512) -> None:
    """What flow sampling adds to the checks of a call (:class:`~.base.PipelineCall`): unguided weights that
    sum to 1 (``guidance_fix``: how to guide instead; the sampler refuses them too, but only after the prompts
    are encoded), and the text encoder's ``max_sequence_length``, 1 to ``longest`` (``lengths``: the usual ones)."""
    if call.options.guidance is None and (problem := unguided_flow_problem(call.options.combiner, guidance_fix)):
        raise ValueError(problem)
    n = call.max_sequence_length
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= longest:
        _fail("max_sequence_length", n, f"use an integer in 1..{longest} ({lengths})")


def is_number(value: Any) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_true_cfg(true_cfg: Any, guidance: Any, negative: Any, options: "SamplingOptions", distilled: bool) -> None:
    """The checks of a family with diffusers' ``true_cfg_scale`` (true classifier-free guidance from a negative
    prompt, the sampler's guidance ``options.guidance``) and a distilled ``guidance_scale`` input (``distilled``:
    the transformer takes one, so None is refused), each naming the argument, the value and what works."""
    if true_cfg is not None and (not is_number(true_cfg) or true_cfg < 0):
        _fail("true_cfg_scale", true_cfg, "use a finite number >= 0 (e.g. 4.0 with a negative_prompt; 1 or "
              "less, or None, samples without true classifier-free guidance, as in diffusers)")
    if guidance is None and distilled:
        _fail("guidance_scale", None, "this transformer is guidance-distilled (guidance_embeds, as FLUX.1-dev): "
              "the distilled guidance is one of its inputs; pass a number, e.g. 3.5 (FluxPipeline's default)")
    if guidance is not None and (not is_number(guidance) or guidance < 0):
        _fail("guidance_scale", guidance, "use a finite number >= 0: the distilled guidance embedding, "
              "e.g. 3.5 (true classifier-free guidance is true_cfg_scale)")
    if options.guidance is not None and negative is None:
        _fail("true_cfg_scale", true_cfg, "true classifier-free guidance steers from a negative prompt's "
              "velocity, and none was given (diffusers' FluxPipeline then skips it); pass negative_prompt=... "
              "('' for the empty prompt), or true_cfg_scale=1")
    if options.guidance is None and negative is not None:
        _fail("negative_prompt", negative, f"it is the unconditional branch of true classifier-free "
              f"guidance, which true_cfg_scale={true_cfg!r} turns off (it runs for true_cfg_scale > 1, as "
              "in diffusers' FluxPipeline); pass true_cfg_scale above 1 (e.g. 4.0) or no negative_prompt")
    check_guidance(options.guidance, options.combiner, "true_cfg_scale")


def refuse_text_arguments(**given: Any) -> None:
    """An unconditional stack's refusal of the text pipelines' arguments it has no use for, by name."""
    for name, value in given.items():
        if value is not None:
            _fail(name, value, "an unconditional stack has no prompts and no classifier-free guidance: it "
                  "composes its unets with mode=...; leave it out (num_images_per_prompt / batch_size set the "
                  "number of images)")


def batch_size_argument(batch_size: Any, num_images_per_prompt: Any) -> tuple[Any, str]:
    """``batch_size``, or the text pipelines' name for it, ``num_images_per_prompt`` (default 1), and the
    name the caller used (for the messages)."""
    if batch_size is None:
        if num_images_per_prompt is None:
            return 1, "batch_size"
        return num_images_per_prompt, "num_images_per_prompt"
    if num_images_per_prompt is not None and num_images_per_prompt != batch_size:
        _fail("num_images_per_prompt", num_images_per_prompt, f"it is another name for batch_size, given as "
              f"{batch_size!r}; pass one of them")
    return batch_size, "batch_size"


def prompts_argument(prompts: Any, prompt: Any) -> Any:
    """``prompts``, or diffusers' name for them, ``prompt`` (a string becomes a one-prompt list)."""
    if prompt is None:
        return prompts
    if prompts is not None:
        _fail("prompt", prompt, "pass the prompts once, as prompts=[...] or as diffusers' prompt=[...]")
    return [prompt] if isinstance(prompt, str) else prompt


def check_prompts(prompts: Any, argument: str = "prompts") -> int:
    """Validate the list of prompts; returns M (the combiner checks M against its mode). Expressions'
    leaves, which may include the empty prompt, are checked by :func:`resolve_composition`."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        _fail(argument, prompts, 'pass a list of prompt strings, e.g. ["a flamingo", "a candy cane"]')
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            _fail(f"{argument}[{i}]", p, "every prompt must be a non-empty string")
    return len(prompts)


def resolve_combiner(
    combiner: Any, mode: str | None, temperature: float | None, log_weights: Sequence[float] | None,
    num_models: int, what: str, default_mode: str,
) -> Combiner:
    """The one combiner of a call: ``combiner=`` as given, or built from ``mode`` (default
    ``default_mode``), ``temperature`` and ``log_weights``; checked against the ``num_models``
    composed ``what`` ("prompts", "unets") by the combiner itself (:func:`~superdiff.combine.check_combiner`)."""
    if combiner is None:
        return make_combiner(
            default_mode if mode is None else mode,
            num_models,
            1.0 if temperature is None else temperature,
            log_weights,
            what=what,
        )
    given = [name for name, value in (("mode", mode), ("temperature", temperature), ("log_weights", log_weights))
             if value is not None]
    if given:
        _fail(
            "combiner",
            combiner,
            f"it already says how to compose, so {', '.join(given)} would be ignored; pass either "
            f"combiner=... or {'/'.join(given)}, not both",
        )
    check_combiner(combiner, num_models, what)
    return combiner


def resolve_composition(
    expression: Any, prompts: Any, combiner: Any, mode: str | None, temperature: float | None,
    log_weights: Sequence[float] | None, what: str, default_mode: str,
) -> tuple[list[str], Combiner]:
    """The composed prompts and the one combiner of a call.

    Without ``expression``: ``prompts`` as given (checked by :func:`check_prompts`) and the combiner
    of :func:`resolve_combiner`. With ``expression`` (a string in the syntax of
    :mod:`superdiff.expression_syntax`, or a node tree): its leaves are the prompts, each evaluated
    once however often it appears (``""`` is the empty prompt, NOT's default reference), and the
    compiled expression is the combiner; ``prompts``, ``combiner``, ``mode``, ``temperature`` and
    ``log_weights`` must then be left out."""
    if expression is None:
        m = check_prompts(prompts, what)
        return list(prompts), resolve_combiner(combiner, mode, temperature, log_weights, m, what, default_mode)
    given = [name for name, value in (("prompts", prompts), ("combiner", combiner), ("mode", mode),
                                      ("temperature", temperature), ("log_weights", log_weights)) if value is not None]
    if given:
        _fail("expression", expression, f"it names the {what} and how to compose them, so {', '.join(given)} would "
              f"be ignored; pass either expression=... or {'/'.join(given)}")
    expression = _expression_node(expression)
    leaves = leaf_names(expression)
    for leaf in leaves:
        if not isinstance(leaf, str):
            _fail("expression", expression, f"its leaf {leaf!r} is a model index; a text pipeline's leaves are "
                  'prompts in quotes, e.g. "red"')
    return list(leaves), compile_expression(expression, leaves)


def model_expression(
    expression: Any, num_models: int, combiner: Any, mode: str | None, temperature: float | None,
    log_weights: Sequence[float] | None,
) -> Combiner:
    """The compiled ``expression`` over a stack of models, whose leaves are the models' indices
    (``"0 | 1"``); the other composition arguments must be left out."""
    given = [name for name, value in (("combiner", combiner), ("mode", mode), ("temperature", temperature),
                                      ("log_weights", log_weights)) if value is not None]
    if given:
        _fail("expression", expression, f"it says how to compose the models, so {', '.join(given)} would be "
              f"ignored; pass either expression=... or {'/'.join(given)}")
    node = _expression_node(expression)
    return compile_expression(node, tuple(range(num_models)))


def _expression_node(expression: Any) -> Any:
    if isinstance(expression, str):
        from ..expression_syntax import parse_expression

        return parse_expression(expression)
    if not isinstance(expression, NODE_TYPES):
        _fail("expression", expression, "pass a string such as '\"red\" & \"circle\"' or a node tree "
              "(superdiff.expressions)")
    return expression


@dataclass(frozen=True, eq=False)
class SamplingOptions:
    """The options of one pipeline call, resolved once at the top of ``__call__`` (the combiner
    from ``combiner=`` or ``mode=``) and passed whole to :func:`check_options` and the sampler.
    ``sampler``: the sampling options (:class:`superdiff.options.SamplerOptions`), each checked
    when built from the call's keyword arguments."""

    combiner: Combiner
    num_inference_steps: int
    guidance_scale: float | None = None
    num_images_per_prompt: int = 1
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: torch.Tensor | None = None
    output_type: str = "pil"
    return_dict: bool = True
    progress: bool = True
    callback_on_step_end: Callable | None = None
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)
    sampler: SamplerOptions = field(default_factory=SamplerOptions)

    def __post_init__(self) -> None:  # particles=None becomes the composition's K (SamplerOptions.for_combiner)
        object.__setattr__(self, "sampler", self.sampler.for_combiner(self.combiner))

    @property
    def particles(self) -> int:
        return self.sampler.particles

    @property
    def resample_threshold(self) -> float:
        return self.sampler.resample_threshold

    @property
    def density_variance(self) -> str:
        return self.sampler.density_variance

    @property
    def guidance(self) -> float | None:
        """The classifier-free guidance weight w the sampler applies: ``guidance_scale`` above 1,
        else None. ``guidance_scale`` ≤ 1 (or None) means no guidance, as in diffusers
        (``do_classifier_free_guidance = guidance_scale > 1``): the unconditional rows are not evaluated."""
        w = self.guidance_scale
        return float(w) if w is not None and w > 1 else None


def check_options(options: SamplingOptions, batch_argument: str = "num_images_per_prompt",
                  scheduler: Any = None) -> None:
    """The checks of the options that the combiner and the sampler do not make before the first
    network call, with the argument, the value and what works. ``batch_argument`` names the batch
    size as the caller spelled it (the unconditional pipeline's ``batch_size``); ``scheduler``, the
    pipeline's, bounds the steps by its training timesteps before any prompt is encoded."""
    guidance_scale, steps, batch = options.guidance_scale, options.num_inference_steps, options.num_images_per_prompt
    # The sampler checks guidance_scale too, but only once the prompts are encoded: this one comes first.
    if guidance_scale is not None and (
        not isinstance(guidance_scale, numbers.Real) or not math.isfinite(guidance_scale) or guidance_scale < 0
    ):
        _fail("guidance_scale", guidance_scale, "use a finite number >= 0 (e.g. 7.5; 1 or less, or None, samples "
              "without guidance, as in diffusers)")
    check_guidance(options.guidance, options.combiner)  # w times the composition's gain: superdiff.limits
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        _fail("num_inference_steps", steps, "use a positive integer, e.g. 50")
    if scheduler is not None and (problem := steps_problem(scheduler, int(steps))):
        raise ValueError(problem)
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        _fail(batch_argument, batch, "use a positive integer")
    if options.output_type not in OUTPUT_TYPES:
        _fail("output_type", options.output_type, f"use one of {OUTPUT_TYPES}")
    if options.particles > 1 and options.latents is not None:
        _fail("latents", "<a tensor>", f"latents give one starting point per image, and particles={options.particles} "
              "draws that many per image; pass latents=None (the generator draws them) or particles=1")
    generator = options.generator
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(
                f"generator=<a list of {len(generator)} items> is not valid: a list needs one torch.Generator per "
                f"image ({batch}); pass that many, or one generator for the whole batch"
            )
    elif generator is not None and not isinstance(generator, torch.Generator):
        _fail("generator", generator, "pass a torch.Generator (it drives the whole batch), one per image, or None")
    callback = options.callback_on_step_end
    if callback is not None and not callable(callback):
        _fail("callback_on_step_end", callback, "pass a callable (pipe, step, timestep, callback_kwargs) or None")
    names = callback_tensor_names(callback, options.callback_on_step_end_tensor_inputs)
    if (
        isinstance(names, str)
        or not isinstance(names, (list, tuple))
        or any(n not in CALLBACK_TENSOR_INPUTS for n in names)
    ):
        _fail("callback_on_step_end_tensor_inputs", names, f"pass a list of names from {list(CALLBACK_TENSOR_INPUTS)}")


def check_rows(options: SamplingOptions, num_models: int, batch_argument: str = "num_images_per_prompt") -> None:
    """Refuse a call whose one network call per step would hold more than
    :data:`superdiff.limits.MAX_NETWORK_ROWS` rows: images × particles × (``num_models`` + the
    unconditional row under guidance); the message names the argument to lower. After :func:`check_options`."""
    problem = rows_problem(int(options.num_images_per_prompt), int(options.particles), num_models,
                           options.guidance is not None, names=(batch_argument, "particles"))
    if problem:
        raise ValueError(problem)


def check_text_inputs(negative_prompt: Any, height: Any, width: Any, multiple: int, options: SamplingOptions) -> None:
    """The text-to-image pipelines' own arguments: one negative prompt (only with guidance), and
    image sizes that are multiples of ``multiple``."""
    one_in_a_list = (
        isinstance(negative_prompt, (list, tuple))
        and len(negative_prompt) == 1
        and isinstance(negative_prompt[0], str)
    )
    if negative_prompt is not None and not isinstance(negative_prompt, str) and not one_in_a_list:
        _fail(
            "negative_prompt",
            negative_prompt,
            "pass one string or a one-element list of it (the composed prompts share "
            "one unconditional branch, so one negative prompt), or None",
        )
    if negative_prompt is not None and options.guidance is None:
        _fail(
            "negative_prompt",
            negative_prompt,
            f"it is the unconditional branch of guidance, which guidance_scale={options.guidance_scale!r} turns off "
            "(None or 1 or less: no guidance, as in diffusers); pass a guidance_scale above 1 (e.g. 7.5) or no "
            "negative_prompt",
        )
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0 or value % multiple:
            below = max(multiple, (int(value) // multiple) * multiple) if isinstance(value, numbers.Real) else multiple
            _fail(
                name,
                value,
                f"must be a positive multiple of {multiple} (image pixels per latent pixel or transformer "
                f"patch); e.g. {below}",
            )


def check_latents(latents: Any, shape: tuple[int, ...], layout: str) -> None:
    """A user's starting noise (diffusers' ``latents=``): None, or a finite floating tensor of exactly
    the sampled ``shape`` (``layout`` names its dims for the message)."""
    if latents is None:
        return
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        given = f"<a {latents.dtype} tensor>" if isinstance(latents, torch.Tensor) else f"<a {type(latents).__name__}>"
        raise ValueError(
            f"latents={given} is not valid: pass a floating torch.Tensor of shape {tuple(shape)} {layout}, "
            "or None to draw the noise"
        )
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(
            f"latents=<a tensor of shape {tuple(latents.shape)}> is not valid: this call samples shape {tuple(shape)} "
            f"{layout}; pass latents of that shape, or change the batch size / height / width to match them"
        )
    if not bool(torch.isfinite(latents).all()):
        _fail("latents", "<a tensor with NaN or inf>", "every entry must be finite")


def refuse_embeddings(**given: Any) -> None:
    """diffusers' precomputed-embedding arguments (``prompt_embeds=`` & co), refused by name: superdiff
    encodes the composed prompts and the unconditional one itself, in one text-encoder call."""
    for name, value in given.items():
        if value is not None:
            _fail(
                name,
                f"<{type(value).__name__}>",
                "superdiff pipelines do not take precomputed text embeddings; pass "
                "the texts as prompts=[...] (and negative_prompt=...), which are encoded once per call",
            )


def negative_text(negative_prompt: str | Sequence[str] | None) -> str | None:
    """The one negative prompt of a checked ``negative_prompt`` (a string or a one-element list)."""
    return negative_prompt if negative_prompt is None or isinstance(negative_prompt, str) else negative_prompt[0]


def callback_tensor_names(callback_on_step_end: Any, names: Any) -> Any:
    """The tensors a step callback receives: ``names``, or the ``tensor_inputs`` of a diffusers
    ``PipelineCallback`` / ``MultiPipelineCallbacks`` (diffusers' rule)."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
        return callback_on_step_end.tensor_inputs
    return names


def guided_conditions(conditions: dict[str, Any], num_prompts: int, guidance: float | None) -> dict[str, Any]:
    """The network conditions of a call: with guidance, the prompts' rows and the unconditional
    one; unguided (``guidance`` None: :attr:`SamplingOptions.guidance`), the M prompt-conditional
    models alone."""
    return prompt_rows(conditions, num_prompts) if guidance is None else conditions


def prompt_rows(conditions: dict[str, Any], num_prompts: int) -> dict[str, Any]:
    """The conditions of the prompts alone (their first ``num_prompts`` rows, nested dicts too),
    dropping the unconditional row: unguided sampling never evaluates it."""
    return {
        name: prompt_rows(value, num_prompts) if isinstance(value, dict) else value[:num_prompts]
        for name, value in conditions.items()
    }


def sampling_schedule(schedule: Schedule, sampler: SamplerOptions) -> Schedule:
    """``schedule`` with the times the sampling options ask for. ``time_grid``: the scheduler's own
    ("scheduler"), or a grid of :data:`superdiff.time_grids.GRIDS` on its process between the same
    first and last network times, closed by the same final time (the same network evaluations either
    way). ``final_denoise=False``: the last step lands on that final time instead of σ = 0, so a
    closing time equal to the last network time (a grid that reaches timestep 0) is dropped."""
    times = schedule.times
    if sampler.time_grid != "scheduler" and times.numel() >= 3:  # one step: nothing to space
        from ..time_grids import GRIDS

        try:
            grid = GRIDS[sampler.time_grid](schedule.process, times.numel() - 2, t_start=float(times[0]),
                                            t_end=float(times[-2]))
        except ValueError as exc:
            process = type(schedule.process).__name__
            raise ValueError(f"time_grid={sampler.time_grid!r} does not apply to this scheduler's {process} "
                             f"process ({exc}); use time_grid='scheduler', 'uniform' or 'quadratic'") from None
        times = torch.cat([grid.to(times), times[-1:]])
    if not sampler.final_denoise and times.numel() >= 2 and float(times[-1]) >= float(times[-2]):
        times = times[:-1]
        if times.numel() < 2:
            raise ValueError("final_denoise=False is not valid with one step that ends at the network's last "
                             "timestep: there is no step left; use num_inference_steps >= 2 or final_denoise=True")
    return schedule if times is schedule.times else replace(schedule, times=times)


def decode(vae: Any, latents: torch.Tensor, image_processor: Any, output_type: str, shift: float = 0.0) -> Any:
    """Latents → images: ``vae.decode(latents / scaling_factor + shift)`` (``vae=None``: the latents
    are pixels in [−1, 1]), then diffusers' image postprocessing."""
    if output_type == "latent":
        return latents
    if vae is not None:
        dtype = vae.dtype
        upcast = dtype == torch.float16 and bool(vae.config.get("force_upcast", False))
        if upcast:
            vae.to(torch.float32)
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is not None and std is not None:  # per-channel latent statistics (some SDXL-type VAEs)
            view = (1, -1) + (1,) * (latents.dim() - 2)
            mean = torch.tensor(mean, device=latents.device).view(view)
            std = torch.tensor(std, device=latents.device).view(view)
            z = latents * std / vae.config.scaling_factor + mean
        else:
            z = latents / vae.config.scaling_factor + shift
        images = vae.decode(z.to(vae.dtype), return_dict=False)[0].float()
        if upcast:
            vae.to(dtype)
    else:
        images = latents.float()
    return image_processor.postprocess(images.detach().cpu(), output_type=output_type)
